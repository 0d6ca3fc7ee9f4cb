#!/usr/bin/env python
"""The paper's NLP-table claim in miniature, on the embedded demo world, in one command (CPU, one process):

    python tools/demo_experiment.py --world paper --seeds 3        # into runs/demo_experiment/paper
    python tools/demo_experiment.py --world no_leak --variants mks2 inst_lora wo_mome --stage2-steps 200

Per seed (train.seed = --seed + k of every stage):
0. a demo base LM (the stand-in for Llama-2) is pretrained on the world's plain text (mks2/demo/base_lm.py);
1. stage 1 (launch/pretrain_mvm.py) stores the objects' looks from images into the MVM experts (the paper
   world also trains the control: the same stage 1 on the same captions with one blank image for all,
   retrieval weight 0: what the caption text alone stores);
2. stage 2 (launch/finetune_mome.py) instruction-tunes each variant: MKS2 and the baselines/ablations of
   mks2/training/ablations.py (INST-LoRA starts from the base LM and never sees stage-1 data);
3. every variant answers the demo's text-only multiple-choice questions about the looks of the 10
   HELD-OUT objects and, as a control, about the 20 training objects; stage 1 is probed (held-out
   retrieval, looks probe, linear probes).

Prints a table (mean and standard error over seeds and questions) and writes <out>/<world>/results.json and
results.md. Runs reuse finished steps of an earlier invocation with the same settings (--fresh starts
over). All stages run as single-process jobs of the real launchers (DeepSpeed engine, ZeRO-3 on one rank).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORLDS = ("no_leak", "paper")
NO_IMAGES = "mks2_no_images"
"""MKS2 whose stage 1 trained on the captions without images (paper world): the text-only control."""
VARIANTS = ("mks2", "inst_lora", "wo_mome", "wo_mm_sft", "wo_text_sft", NO_IMAGES)
DEFAULT_VARIANTS = {
    "no_leak": ("mks2", "inst_lora", "wo_mome", "wo_mm_sft", "wo_text_sft"),
    "paper": ("mks2", "inst_lora", "wo_mome", NO_IMAGES),
}
KINDS = ("colour", "shape", "describe", "yes_no", "which")
LABELS = {NO_IMAGES: "MKS2, stage 1 without images"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_experiment", help="output directory (results in OUT/WORLD)")
    p.add_argument("--world", default="no_leak", choices=WORLDS, help="demo world (data.demo_world)")
    p.add_argument("--seeds", type=int, default=1, help="independent seeds (--seed, --seed+1, ...)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"stage-2 variants ({', '.join(VARIANTS)}); default per world: {DEFAULT_VARIANTS}",
    )
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--stage1-steps", type=int, default=600)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1234, help="train.seed of every stage of the first seed")
    p.add_argument("--cache-dir", default="~/.cache/mks2", help="demo world cache (data.cache_dir)")
    p.add_argument("--stage1-args", nargs="*", default=[], help="extra key=value overrides of stage 1")
    p.add_argument("--stage2-args", nargs="*", default=[], help="extra key=value overrides of every stage-2 run")
    p.add_argument("--eval-limit", type=int, default=None, help="first N questions of each file (smoke tests)")
    p.add_argument("--fresh", action="store_true", help="delete earlier results in OUT/WORLD first")
    args = p.parse_intermixed_args(argv)
    if args.variants is None:
        args.variants = list(DEFAULT_VARIANTS[args.world])
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """A world of one for the launchers (a free port: other jobs may hold the default 29500)."""
    env = dict(os.environ)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The launchers import mks2 from this checkout (as this process does), not from wherever the package is
    # installed: a run's stages and its evaluation must share one schema and one demo fingerprint.
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
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
    keys = ("world", "base_steps", "stage1_steps", "stage2_steps", "stage1_args", "stage2_args", "eval_limit")
    return {k: getattr(args, k) for k in keys}


def _common(args: argparse.Namespace, seed: int) -> list[str]:
    cache = str(Path(args.cache_dir).expanduser())
    return [f"data.cache_dir={cache}", f"data.demo_world={args.world}", f"train.seed={seed}"]


def run_stages(args: argparse.Namespace, out: Path, seed: int, timings: dict[str, float]) -> None:
    """Base LM, stage 1 (and the no-images stage 1 if a variant needs it), the stage-2 variants of one seed."""
    from mks2.demo.base_lm import pretrain_demo_base

    common = _common(args, seed)
    base = out / "base_lm"
    if not (base / "config.json").is_file():
        t0 = time.perf_counter()
        summary = pretrain_demo_base(base, steps=args.base_steps, seed=seed, overrides=common[:2])
        timings["base LM"] = time.perf_counter() - t0
        (out / "base_lm.json").write_text(json.dumps(summary, indent=2))
        print(
            f"[0] base LM: loss {summary['loss_first']:.2f} -> {summary['loss_last']:.2f} ({timings['base LM']:.0f} s)"
        )
    stage1_runs: dict[str, list[str]] = {}
    if any(v not in ("inst_lora", NO_IMAGES) for v in args.variants):  # INST-LoRA never sees stage 1
        stage1_runs["stage1"] = []
    if NO_IMAGES in args.variants:  # the same captions, one blank image for all, no retrieval objective
        stage1_runs["stage1_no_images"] = ["data.datasets=[demo:captions_noimage]", "train.retrieval_loss_weight=0"]
    for name, extra in stage1_runs.items():
        save = out / name
        if _done(save, args.stage1_steps):
            continue
        s1 = [
            f"model.init_from={base}",
            *common,
            f"train.save_dir={save}",
            f"train.max_steps={args.stage1_steps}",
            "train.save_interval=0",
            "train.resume=none",
            "train.warmup_steps=20",
            *extra,
            *args.stage1_args,
        ]
        timings[name] = _launch("pretrain_mvm.py", s1, out / f"{name}.log", name)
        print(f"[1] {name}: {args.stage1_steps} steps ({timings[name]:.0f} s)")
    for v in args.variants:
        save = out / f"stage2_{v}"
        if _done(save, args.stage2_steps):
            continue
        stage1 = out / ("stage1_no_images" if v == NO_IMAGES else "stage1")
        s2 = [
            "--ablation",
            "mks2" if v == NO_IMAGES else v,
            *common,
            f"train.save_dir={save}",
            f"train.max_steps={args.stage2_steps}",
            "train.save_interval=0",
            "train.resume=none",
            *args.stage2_args,
        ]
        # INST-LoRA: the base LM, never stage 1 (a command-line init_from_stage1 would override its preset's null)
        s2.append(f"model.init_from={base}" if v == "inst_lora" else f"model.init_from_stage1={stage1}")
        timings[f"stage 2 {v}"] = _launch("finetune_mome.py", s2, out / f"stage2_{v}.log", f"stage 2 ({v})")
        print(f"[2] stage 2 {v}: {args.stage2_steps} steps ({timings[f'stage 2 {v}']:.0f} s)")


def evaluate_seed(args: argparse.Namespace, out: Path, timings: dict[str, float]) -> dict:
    """Every variant's multiple choice (held-out and seen) and the probes of one seed. Each piece is cached in
    out/seed_results.json as soon as it is done: a later invocation evaluates only what is missing (another
    variant, a stage 1 trained since)."""
    from mks2.demo import resolve_path
    from mks2.eval import load_for_eval, run_evaluation
    from mks2.eval.demo_probe import looks_linear_probe, stage1_looks_probe

    cached = out / "seed_results.json"
    results: dict = json.loads(cached.read_text()) if cached.is_file() else {"variants": {}, "linear_probe": {}}
    if results.get("eval_limit") != args.eval_limit:
        results = {"variants": {}, "linear_probe": {}, "eval_limit": args.eval_limit}
    cache = str(Path(args.cache_dir).expanduser())

    def path(name: str) -> str:
        return resolve_path(f"demo:{name}", cache, progress=False, world=args.world)

    def save() -> None:
        cached.write_text(json.dumps(results, indent=2) + "\n")

    files = {name: path(name) for name in ("eval_mc", "eval_mc_seen")}
    t0 = time.perf_counter()
    if "base LM" not in results["linear_probe"]:
        results["linear_probe"]["base LM"] = looks_linear_probe(load_for_eval(out / "base_lm", chat_template="llama2"))
        save()
    for name in ("stage1", "stage1_no_images"):
        if not (out / name).is_dir() or f"{name}_retrieval" in results:
            continue
        em = load_for_eval(out / name)
        rep = run_evaluation(em, retrieval=[path("eval_retrieval")], image_root=path("images"), limit=args.eval_limit)
        results[f"{name}_looks_probe"] = stage1_looks_probe(em)
        results["linear_probe"][name.replace("_", " ")] = looks_linear_probe(em)
        results[f"{name}_retrieval"] = next(iter(rep["retrieval"].values()))
        save()
    for v in args.variants:
        if v in results["variants"]:
            continue
        em = load_for_eval(out / f"stage2_{v}")
        rep = run_evaluation(
            em, mc=[files["eval_mc"], files["eval_mc_seen"]], keep_predictions=False, limit=args.eval_limit
        )
        r = {"heldout": rep["multiple_choice"]["mc_heldout"], "seen": rep["multiple_choice"]["mc_seen"]}
        if v == "mks2":  # where does the answer come from: each expert alone
            for gates, label in (([1.0, 0.0], "mlp_only"), ([0.0, 1.0], "mvm_only")):
                g = run_evaluation(
                    em, mc=[files["eval_mc"]], force_gates=gates, keep_predictions=False, limit=args.eval_limit
                )
                r[f"heldout_{label}"] = g["multiple_choice"]["mc_heldout"]
        results["linear_probe"][f"stage 2 {v}"] = looks_linear_probe(em)
        results["variants"][v] = r
        save()
    timings["evaluation"] = time.perf_counter() - t0
    return results


# ------------------------------------------------------------------------------------------------
# Aggregation over seeds: every (seed, question) answer is one Bernoulli trial
# ------------------------------------------------------------------------------------------------


def pooled(results: list[dict], kind: str | None) -> dict[str, float]:
    """Accuracy over all seeds and questions of one kind (None: all kinds) -> {acc, se, n, chance, per_seed}.
    se = sqrt(p (1 - p) / N) over the N = seeds x questions answers (seeds and questions both vary)."""
    rows = [r if kind is None else r["by_kind"].get(kind) for r in results]
    rows = [r for r in rows if r is not None]
    if not rows:
        return {}
    n = sum(r["n"] for r in rows)
    hits = sum(r["acc"] * r["n"] for r in rows)
    acc = hits / n
    chance = sum(r["chance"] * r["n"] for r in rows) / n
    return {
        "acc": acc,
        "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
        "n": n,
        "chance": chance,
        "per_seed": [r["acc"] for r in rows],
    }


def aggregate(per_seed: list[dict], variants: list[str]) -> dict:
    out: dict = {}
    for v in variants:
        out[v] = {}
        for split in ("heldout", "seen", "heldout_mlp_only", "heldout_mvm_only"):
            rs = [r["variants"][v][split] for r in per_seed if split in r["variants"][v]]
            if rs:
                out[v][split] = {"all": pooled(rs, None), **{k: pooled(rs, k) for k in KINDS if pooled(rs, k)}}
    return out


def _fmt(x: dict) -> str:
    return "-" if not x else f"{x['acc']:.1%} ± {x['se']:.1%}"


def paired_over_seeds(a: list[float], b: list[float]) -> dict[str, float] | None:
    """Mean per-seed difference a - b and its standard error over seeds (sd / sqrt(k), k >= 2 seeds), or None
    for one seed. Variants of one seed share its base LM and stage 1, so their difference is paired; and the
    questions about one object are not independent trials (three wordings of one colour question), which
    the seeds x questions SE ignores, so this one, though estimated from few seeds, is the honest check."""
    k = len(a)
    if k < 2 or len(b) != k:
        return None
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / k
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (k - 1))
    return {"diff": mean, "se": sd / math.sqrt(k), "seeds": k}


def comparisons(agg: dict) -> list[str]:
    """MKS2 against the baselines on held-out questions, in standard errors of the difference: over seeds x
    questions, and paired over seeds."""
    lines = []
    if "mks2" not in agg:
        return lines
    a = agg["mks2"]["heldout"]["all"]
    for v in agg:
        if v == "mks2":
            continue
        b = agg[v]["heldout"]["all"]
        se = math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        d = a["acc"] - b["acc"]
        line = f"MKS2 - {_label(v)} on held-out: {d:+.1%} ({d / se:+.1f} SE of the difference over seeds x questions"
        p = paired_over_seeds(a["per_seed"], b["per_seed"])
        if p is None:
            line += "; one seed, no SE over seeds)"
        else:
            t = p["diff"] / p["se"] if p["se"] > 0 else math.inf
            line += f"; paired over {p['seeds']} seeds {p['diff']:+.1%} ± {p['se']:.1%}, {t:+.1f} SE)"
        lines.append(line)
    return lines


def _label(v: str) -> str:
    from mks2.training.ablations import ABLATIONS

    return LABELS.get(v) or ABLATIONS[v].label


def table(agg: dict, per_seed: list[dict]) -> str:
    head = "| model | " + " | ".join(KINDS) + " | held-out avg | seen (control) avg |"
    lines = [head, "|" + "---|" * (len(KINDS) + 3)]
    any_v = next(iter(agg.values()))
    chance = [f"{any_v['heldout'][k]['chance']:.1%}" if k in any_v["heldout"] else "-" for k in KINDS]
    lines.append(
        "| chance | "
        + " | ".join(chance)
        + f" | {any_v['heldout']['all']['chance']:.1%} | {any_v['seen']['all']['chance']:.1%} |"
    )
    for v, r in agg.items():
        cells = [_fmt(r["heldout"].get(k, {})) for k in KINDS]
        lines.append(
            f"| {_label(v)} | " + " | ".join(cells) + f" | **{_fmt(r['heldout']['all'])}** | {_fmt(r['seen']['all'])} |"
        )
    seen_cells = {v: [_fmt(r["seen"].get(k, {})) for k in KINDS] for v, r in agg.items()}
    lines += [
        "",
        "Seen objects (control), per kind:",
        "",
        "| model | " + " | ".join(KINDS) + " |",
        "|" + "---|" * (len(KINDS) + 1),
    ]
    lines += [f"| {_label(v)} | " + " | ".join(c) + " |" for v, c in seen_cells.items()]
    lines += [
        "",
        "Where the held-out looks are (linear probe fit on the 20 training objects, tested on the 10 held-out;",
        "mean over seeds; chance: colour 17%, shape 20%):",
        "",
        "| model | caption EOS: colour | shape | question: colour | shape |",
        "|---|---|---|---|---|",
    ]
    for name in per_seed[0]["linear_probe"]:
        rs = [r["linear_probe"][name] for r in per_seed if name in r["linear_probe"]]

        def m(place: str, k: str, rs: list[dict] = rs) -> str:
            return f"{sum(r[place][k] for r in rs) / len(rs):.0%}"

        lines.append(
            f"| {name} | {m('caption_eos', 'colour')} | {m('caption_eos', 'shape')} | "
            f"{m('question', 'colour')} | {m('question', 'shape')} |"
        )
    return "\n".join(lines)


def probe_lines(per_seed: list[dict]) -> list[str]:
    out = []
    for name in ("stage1", "stage1_no_images"):
        rs = [r[f"{name}_retrieval"] for r in per_seed if f"{name}_retrieval" in r]
        if not rs:
            continue
        r1 = sum(r["recall@1"] for r in rs) / len(rs)
        r5 = sum(r["recall@5"] for r in rs) / len(rs)
        out.append(
            f"{name}: held-out text-to-image retrieval R@1 {r1:.1%}, R@5 {r5:.1%} "
            f"(chance {rs[0]['chance@1']:.0%} / {rs[0]['chance@5']:.0%}; mean of {len(rs)} seed(s))"
        )
        ps = [r[f"{name}_looks_probe"] for r in per_seed]
        ho = {k: sum(p["heldout"][k] for p in ps) / len(ps) for k in ("colour", "shape", "class")}
        ch = ps[0]["chance"]
        out.append(
            f"{name}: looks probe, held-out objects (caption 'a picture of a large NAME in the center' vs 30 "
            f"single-object renders, retrieval head): colour {ho['colour']:.0%} (chance {ch['colour']:.0%}), shape "
            f"{ho['shape']:.0%} (chance {ch['shape']:.0%}), both {ho['class']:.0%} (chance {ch['class']:.0%})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    unknown = [v for v in args.variants if v not in VARIANTS and v != "wo_mm_sft_mome"]
    if unknown:
        print(f"error: unknown variant(s) {unknown} (known: {', '.join(VARIANTS)}, wo_mm_sft_mome)", file=sys.stderr)
        return 1
    if NO_IMAGES in args.variants and args.world != "paper":
        print(f"error: {NO_IMAGES} needs --world paper (its captions-without-images shard)", file=sys.stderr)
        return 1
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 1
    root = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out = root / args.world
    settings_file = out / "settings.json"
    if args.fresh or (settings_file.is_file() and json.loads(settings_file.read_text()) != _settings(args)):
        import shutil

        if out.exists():
            print(f"settings changed or --fresh: starting over in {out}")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(_settings(args), indent=2))
    from mks2.demo import ensure_built

    ensure_built(Path(args.cache_dir).expanduser(), world=args.world)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    timings: dict[str, float] = {}
    per_seed = []
    seed_seconds = []
    for k in range(args.seeds):
        seed = args.seed + k
        seed_out = out / f"seed_{seed}"
        seed_out.mkdir(exist_ok=True)
        t_seed = time.perf_counter()
        seed_timings: dict[str, float] = {}
        print(f"== world {args.world}, seed {seed} ({k + 1}/{args.seeds})")
        run_stages(args, seed_out, seed, seed_timings)
        per_seed.append(evaluate_seed(args, seed_out, seed_timings))
        seed_seconds.append(time.perf_counter() - t_seed)
        timings.update({f"seed {seed} {n}": v for n, v in seed_timings.items()})
    agg = aggregate(per_seed, args.variants)
    results = {
        "world": args.world,
        "seeds": [args.seed + k for k in range(args.seeds)],
        "aggregate": agg,
        "per_seed": per_seed,
        "settings": _settings(args),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "seed_wall_s": [round(x, 1) for x in seed_seconds],
        "total_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(_cpu_seconds() - cpu0, 1),  # user + system over all processes and cores
        "load_average_1min_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
    md = table(agg, per_seed)
    extra = comparisons(agg) + probe_lines(per_seed)
    mks2 = agg.get("mks2", {})
    if "heldout_mvm_only" in mks2:
        mlp, mvm = mks2["heldout_mlp_only"]["all"], mks2["heldout_mvm_only"]["all"]
        extra.append(f"MKS2 held-out with the router forced to one expert: MLP only {_fmt(mlp)}, MVM only {_fmt(mvm)}")
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    extra.append(
        f"wall time this invocation: {results['total_s']:.0f} s ({spent}); CPU time {results['cpu_s']:.0f} s on "
        f"{results['cpu_count']} cores, 1-min load average at the end {results['load_average_1min_at_end']:.1f}"
    )
    text = (
        (
            f"World `{args.world}`, {args.seeds} seed(s) {results['seeds']}; accuracy (summed log-likelihood) "
            "± standard error over seeds x questions\n\n"
        )
        + md
        + "\n\n"
        + "\n".join(f"- {e}" for e in extra)
        + "\n"
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text)
    print("\nText-only multiple choice about the looks of the held-out objects (and of the seen ones, a control):\n")
    print(text)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
