#!/usr/bin/env python
"""Evaluate a training checkpoint or an HF export: multiple choice by log-likelihood, open questions by
greedy generation, stage-1 text-to-image retrieval recall@1/5. Prints a summary, writes a JSON report.

    python tools/evaluate.py runs/demo_stage2 --mc demo:eval_mc demo:eval_mc_seen --open demo:eval_open
    python tools/evaluate.py runs/demo_stage1 --retrieval demo:eval_retrieval
    python tools/evaluate.py exports/mks2-7b --mc piqa.jsonl obqa.jsonl siqa.jsonl --output report.json
    python tools/evaluate.py runs/demo_stage2 --mc demo:eval_mc --force-gates 1,0     # MLP expert only

MODEL is a train.save_dir (newest complete checkpoint, or --tag), a step_XXXXXXXX directory, or a
directory with config.json (HF export). Code an HF directory ships runs only with --trust-remote-code, or
when it is an mks2 export whose bundled files match this package's sources (said so). File arguments may be
demo world names (demo:eval_mc, demo:eval_mc_seen, demo:eval_open, demo:eval_open_seen, demo:eval_retrieval).
Multiple-choice JSONL: {"question", "choices": [...], "answer": index} (+ optional "kind" for a breakdown).
Open JSONL: {"question", "answer"} (+ optional "keywords"). Retrieval JSONL: {"image", "caption"}.
Exit status 1 on a bad argument, model or file (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="training save_dir / step directory, or HF export directory")
    p.add_argument("--tag", default=None, help="checkpoint tag in a save_dir (default: newest complete)")
    p.add_argument("--mc", nargs="*", default=[], metavar="FILE", help="multiple-choice JSONL files")
    p.add_argument("--open", nargs="*", default=[], metavar="FILE", help="open-question JSONL files")
    p.add_argument("--retrieval", nargs="*", default=[], metavar="FILE", help="retrieval galleries (stage 1)")
    p.add_argument("--image-root", default=None, help="root of the gallery images (default for demo: its images)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's, or the export directory)")
    p.add_argument(
        "--chat-template", default="auto", help="llama2, vicuna_v1, none (plain prompts) or auto (the run's)"
    )
    p.add_argument("--no-answer-eos", action="store_true", help="score choices without the closing EOS")
    p.add_argument("--force-gates", default=None, help="fixed MoME gates, e.g. 1,0 (MLP expert only)")
    p.add_argument("--batch-size", type=int, default=32, help="records scored or generated together (default 32)")
    p.add_argument(
        "--max-new-tokens", type=int, default=16, help="longest generated answer of --open questions (default 16)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N records of each file")
    p.add_argument("--cache-dir", default=None, help="demo world cache (default: the run's data.cache_dir)")
    p.add_argument("--output", default=None, help="JSON report path (default: <model>/eval_report.json)")
    p.add_argument("--device", default="cpu", help="torch device to evaluate on: cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code an HF model directory ships (an mks2 export whose code matches this package "
        "is trusted without it)",
    )
    return p.parse_args(argv)


def _resolve(spec: str, cache_dir: str, template: str) -> str:
    from mks2.demo import resolve_path

    return resolve_path(spec, cache_dir, chat_template=template if template in ("llama2", "vicuna_v1") else "llama2")


def print_summary(report: dict) -> None:
    for name, r in report["multiple_choice"].items():
        kinds = ", ".join(f"{k} {v['acc']:.1%}" for k, v in r["by_kind"].items())
        gates = f"  gates {r['mean_gates']}" if "mean_gates" in r else ""
        print(f"[mc] {name}: acc {r['acc']:.1%} (norm {r['acc_norm']:.1%}, chance {r['chance']:.1%}, n={r['n']})"
              f"  [{kinds}]{gates}")  # fmt: skip
    for name, r in report["open"].items():
        print(f"[open] {name}: keyword {r['keyword']:.1%}, exact {r['exact']:.1%} (n={r['n']})")
    for name, r in report["retrieval"].items():
        print(f"[retrieval] {name}: R@1 {r['recall@1']:.1%}, R@5 {r['recall@5']:.1%} "
              f"(chance {r['chance@1']:.1%} / {r['chance@5']:.1%}, n={r['n']})")  # fmt: skip


def missing_inputs(args: argparse.Namespace) -> list[str]:
    """The model directory and evaluation files that do not exist (``demo:`` names are built later), checked
    before any model is loaded."""
    missing = [] if Path(args.model).exists() else [f"model {args.model}"]
    for flag, files in (("--mc", args.mc), ("--open", args.open), ("--retrieval", args.retrieval)):
        missing += [f"{flag} {f}" for f in files if not f.startswith("demo:") and not Path(f).is_file()]
    if args.image_root and not Path(args.image_root).is_dir():
        missing.append(f"--image-root {args.image_root}")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = missing_inputs(args)
    if missing:
        print(f"error: evaluation file not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    from mks2.errors import UserError
    from mks2.eval import load_for_eval, run_evaluation, write_report

    try:
        if not (args.mc or args.open or args.retrieval):
            raise ValueError("nothing to evaluate: give --mc, --open and/or --retrieval files")
        gates = None
        if args.force_gates:
            try:
                gates = [float(x) for x in args.force_gates.split(",")]
            except ValueError as exc:
                raise ValueError(f"--force-gates: expected comma-separated numbers, got {args.force_gates!r}") from exc
        template = None if args.chat_template == "none" else args.chat_template
        em = load_for_eval(
            args.model,
            tag=args.tag,
            tokenizer=args.tokenizer,
            chat_template=template,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
        if em.remote_code_note:
            print(em.remote_code_note, file=sys.stderr, flush=True)
        cache = args.cache_dir or em.config.get("data", {}).get("cache_dir") or "~/.cache/mks2"
        tmpl = em.chat_template or "llama2"
        image_root = args.image_root
        if image_root is None and any(f.startswith("demo:") for f in args.retrieval):
            image_root = _resolve("demo:images", cache, tmpl)
        report = run_evaluation(
            em,
            mc=[_resolve(f, cache, tmpl) for f in args.mc],
            open_questions=[_resolve(f, cache, tmpl) for f in args.open],
            retrieval=[_resolve(f, cache, tmpl) for f in args.retrieval],
            image_root=image_root,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            answer_eos=not args.no_answer_eos,
            force_gates=gates,
        )
    except (UserError, ValueError, FileNotFoundError) as exc:  # plain ValueErrors: the model's own input checks
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.output) if args.output else (Path(args.model) / "eval_report.json")
    write_report(out, report)
    print_summary(report)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
