#!/usr/bin/env python
"""The paper's NLP-table claim in miniature, on the embedded demo world, in one command (CPU, one process):

    python tools/demo_experiment.py                       # everything, into runs/demo_experiment
    python tools/demo_experiment.py --variants mks2 inst_lora wo_mome --stage2-steps 200

0. a demo base LM (the stand-in for Llama-2) is pretrained on the demo's plain text (mks2/demo/base_lm.py);
1. stage 1 (launch/pretrain_mvm.py) stores the looks of the objects from images into the MVM experts;
2. stage 2 (launch/finetune_mome.py) instruction-tunes each variant: MKS2 and the baselines/ablations of
   mks2/training/ablations.py (INST-LoRA starts from the base LM, without stage 1);
3. every variant answers the demo's text-only multiple-choice questions about the looks of the 10
   HELD-OUT objects (seen only in images during stage 1) and, as a control, about the training objects
   (whose looks the instruction data states); the stage-1 model is checked by held-out retrieval.

Prints a table like the paper's NLP table and writes <out>/results.json and <out>/results.md. Runs reuse
finished steps of an earlier invocation with the same settings (--fresh starts over). All stages run as
single-process jobs of the real launchers (DeepSpeed engine, ZeRO-3 on one rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("mks2", "inst_lora", "wo_mome", "wo_mm_sft", "wo_text_sft")
KINDS = ("colour", "shape", "describe", "yes_no", "which")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_experiment", help="output directory")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"stage-2 variants ({', '.join(VARIANTS)})")
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--stage1-steps", type=int, default=600)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1234, help="train.seed of every stage")
    p.add_argument("--cache-dir", default="~/.cache/mks2", help="demo world cache (data.cache_dir)")
    p.add_argument("--stage1-args", nargs="*", default=[], help="extra key=value overrides of stage 1")
    p.add_argument("--stage2-args", nargs="*", default=[], help="extra key=value overrides of every stage-2 run")
    p.add_argument("--eval-limit", type=int, default=None, help="first N questions of each file (smoke tests)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in --out first")
    return p.parse_intermixed_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """A world of one for the launchers (a free port: other jobs may hold the default 29500)."""
    env = dict(os.environ)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _done(save_dir: Path, steps: int) -> bool:
    from mks2.checkpoint import list_checkpoints

    complete, _ = list_checkpoints(save_dir)
    return bool(complete) and complete[-1].step >= steps


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _launch(script: str, args: list[str], log: Path, what: str) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(REPO / "launch" / script), *args]
    with log.open("w") as f:
        res = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{what} failed (exit {res.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def _settings(args: argparse.Namespace) -> dict:
    keys = ("base_steps", "stage1_steps", "stage2_steps", "seed", "stage1_args", "stage2_args")
    return {k: getattr(args, k) for k in keys}


def run_stages(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> None:
    from mks2.demo.base_lm import pretrain_demo_base

    cache = str(Path(args.cache_dir).expanduser())
    base = out / "base_lm"
    if not (base / "config.json").is_file():
        t0 = time.perf_counter()
        summary = pretrain_demo_base(base, steps=args.base_steps, seed=args.seed, overrides=[f"data.cache_dir={cache}"])
        timings["base LM"] = time.perf_counter() - t0
        (out / "base_lm.json").write_text(json.dumps(summary, indent=2))
        print(
            f"[0] base LM: loss {summary['loss_first']:.2f} -> {summary['loss_last']:.2f} ({timings['base LM']:.0f} s)"
        )
    stage1 = out / "stage1"
    if not _done(stage1, args.stage1_steps):
        s1 = [f"model.init_from={base}", f"data.cache_dir={cache}", f"train.save_dir={stage1}",
              f"train.max_steps={args.stage1_steps}", "train.save_interval=0", "train.resume=none",
              f"train.seed={args.seed}", "train.warmup_steps=20", *args.stage1_args]  # fmt: skip
        timings["stage 1"] = _launch("pretrain_mvm.py", s1, out / "stage1.log", "stage 1")
        print(f"[1] stage 1: {args.stage1_steps} steps ({timings['stage 1']:.0f} s)")
    for v in args.variants:
        save = out / f"stage2_{v}"
        if _done(save, args.stage2_steps):
            continue
        s2 = ["--ablation", v, f"model.init_from_stage1={stage1}", f"data.cache_dir={cache}", f"train.save_dir={save}",
              f"train.max_steps={args.stage2_steps}", "train.save_interval=0", "train.resume=none",
              f"train.seed={args.seed}", *args.stage2_args]  # fmt: skip
        if v == "inst_lora":
            s2.append(f"model.init_from={base}")
        timings[f"stage 2 {v}"] = _launch("finetune_mome.py", s2, out / f"stage2_{v}.log", f"stage 2 ({v})")
        print(f"[2] stage 2 {v}: {args.stage2_steps} steps ({timings[f'stage 2 {v}']:.0f} s)")


def evaluate_all(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> dict:
    from mks2.demo import resolve_path
    from mks2.eval import load_for_eval, run_evaluation
    from mks2.eval.demo_probe import looks_linear_probe, stage1_looks_probe

    cache = str(Path(args.cache_dir).expanduser())
    files = {name: resolve_path(f"demo:{name}", cache, progress=False) for name in ("eval_mc", "eval_mc_seen")}
    t0 = time.perf_counter()
    results: dict = {"variants": {}}
    em = load_for_eval(out / "stage1")
    gallery, images = (resolve_path(f"demo:{n}", cache, progress=False) for n in ("eval_retrieval", "images"))
    rep = run_evaluation(em, retrieval=[gallery], image_root=images, limit=args.eval_limit)
    results["stage1_retrieval"] = next(iter(rep["retrieval"].values()))
    results["stage1_looks_probe"] = stage1_looks_probe(em)
    results["linear_probe"] = {
        "base LM": looks_linear_probe(load_for_eval(out / "base_lm", chat_template="llama2")),
        "stage 1": looks_linear_probe(em),
    }
    for v in args.variants:
        em = load_for_eval(out / f"stage2_{v}")
        rep = run_evaluation(
            em, mc=[files["eval_mc"], files["eval_mc_seen"]], keep_predictions=False, limit=args.eval_limit
        )
        results["variants"][v] = {
            "heldout": rep["multiple_choice"]["mc_heldout"],
            "seen": rep["multiple_choice"]["mc_seen"],
        }
        results["linear_probe"][f"stage 2 {v}"] = looks_linear_probe(em)
        if v == "mks2":  # where does the answer come from: each expert alone
            for gates, label in (([1.0, 0.0], "mlp_only"), ([0.0, 1.0], "mvm_only")):
                r = run_evaluation(
                    em, mc=[files["eval_mc"]], force_gates=gates, keep_predictions=False, limit=args.eval_limit
                )
                results["variants"][v][f"heldout_{label}"] = r["multiple_choice"]["mc_heldout"]
    timings["evaluation"] = time.perf_counter() - t0
    return results


def table(results: dict) -> str:
    from mks2.training.ablations import ABLATIONS

    head = "| model | " + " | ".join(KINDS) + " | held-out avg | seen (control) avg |"
    lines = [head, "|" + "---|" * (len(KINDS) + 3)]
    any_v = next(iter(results["variants"].values()))

    def cell(result: dict, kind: str, key: str) -> str:
        r = result["by_kind"].get(kind)
        return "-" if r is None else f"{r[key]:.1%}"

    chance = [cell(any_v["heldout"], k, "chance") for k in KINDS]
    lines.append(
        "| chance | " + " | ".join(chance) + f" | {any_v['heldout']['chance']:.1%} | {any_v['seen']['chance']:.1%} |"
    )
    for v, r in results["variants"].items():
        cells = [cell(r["heldout"], k, "acc") for k in KINDS]
        lines.append(
            f"| {ABLATIONS[v].label} | "
            + " | ".join(cells)
            + f" | **{r['heldout']['acc']:.1%}** | {r['seen']['acc']:.1%} |"
        )
    lines += [
        "",
        "Where the held-out looks are (linear probe fit on the 20 training objects, tested on the 10 held-out;",
        "chance: colour 17%, shape 20%):",
        "",
        "| model | caption EOS: colour | shape | question: colour | shape |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["linear_probe"].items():
        c, q = r["caption_eos"], r["question"]
        lines.append(f"| {name} | {c['colour']:.0%} | {c['shape']:.0%} | {q['colour']:.0%} | {q['shape']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [v for v in args.variants if v not in VARIANTS and v != "wo_mm_sft_mome"]
    if unknown:
        print(f"error: unknown variant(s) {unknown} (known: {', '.join(VARIANTS)}, wo_mm_sft_mome)", file=sys.stderr)
        return 1
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    settings_file = out / "settings.json"
    if args.fresh or (settings_file.is_file() and json.loads(settings_file.read_text()) != _settings(args)):
        import shutil

        if out.exists():
            print(f"settings changed or --fresh: starting over in {out}")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(_settings(args), indent=2))
    from mks2.demo import ensure_built

    ensure_built(Path(args.cache_dir).expanduser())
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}
    run_stages(args, out, timings)
    results = evaluate_all(args, out, timings)
    results["settings"] = _settings(args)
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["cpu_s"] = round(_cpu_seconds() - cpu0, 1)  # user + system over all processes and cores
    results["load_average_1min_at_end"] = os.getloadavg()[0]
    results["cpu_count"] = os.cpu_count()
    md = table(results)
    r1 = results["stage1_retrieval"]
    extra = [f"stage-1 held-out text-to-image retrieval: R@1 {r1['recall@1']:.1%}, R@5 {r1['recall@5']:.1%} "
             f"(chance {r1['chance@1']:.0%} / {r1['chance@5']:.0%})"]  # fmt: skip
    probe = results["stage1_looks_probe"]
    ho, ch = probe["heldout"], probe["chance"]
    extra.append(
        f"stage-1 looks probe, held-out objects (caption 'a picture of a large NAME' vs 30 single-object renders, "
        f"retrieval head): colour {ho['colour']:.0%} (chance {ch['colour']:.0%}), shape {ho['shape']:.0%} "
        f"(chance {ch['shape']:.0%}), both {ho['class']:.0%} (chance {ch['class']:.0%})"
    )
    mks2 = results["variants"].get("mks2", {})
    if "heldout_mvm_only" in mks2:
        mlp, mvm = mks2["heldout_mlp_only"]["acc"], mks2["heldout_mvm_only"]["acc"]
        extra.append(f"MKS2 held-out with the router forced to one expert: MLP only {mlp:.1%}, MVM only {mvm:.1%}")
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    extra.append(
        f"wall time this invocation: {results['total_s']:.0f} s ({spent}); CPU time {results['cpu_s']:.0f} s on "
        f"{results['cpu_count']} cores, 1-min load average at the end {results['load_average_1min_at_end']:.1f}"
    )
    text = md + "\n\n" + "\n".join(f"- {e}" for e in extra) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text)
    print("\nText-only multiple choice about the looks of objects seen only in images during stage 1 (held-out):\n")
    print(text)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
