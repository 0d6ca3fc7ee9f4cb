#!/usr/bin/env python
"""Draw the training curves of one or more runs (``<save_dir>/metrics.jsonl``) into a PNG.

    python tools/plot_metrics.py runs/demo_stage1 --output docs/figures/demo_stage1.png
    python tools/plot_metrics.py runs/a runs/b --keys loss loss_retrieval --smooth 10 --output cmp.png

One panel per metric (default: those of DEFAULT_KEYS that any run has: stage 1's losses and retrieval
accuracy, stage 2's answer tokens, both stages' held-out evaluation, lr, grad_norm, real tokens/s, the
padding share and MFU where logged; definitions: docs/METRICS.md). Held-out
evaluation series (``eval_*``: recorded every ``train.eval_interval`` steps) are drawn as lines with a
marker and the value at each evaluated step, whichever the stage. ``--smooth N`` adds a trailing moving
average of N steps to the per-step series.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_KEYS = (
    "loss",
    "loss_caption",
    "loss_retrieval",
    "retrieval_acc",
    "eval_retrieval_top1",
    "eval_retrieval_top5",
    "eval_loss",
    "eval_loss_text",
    "eval_loss_multimodal",
    "answer_tokens",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "padding_fraction",
    "mfu",
)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (pass a train.save_dir or a metrics.jsonl file)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: {path}:{n}: not JSON ({exc.msg})") from exc
    if not records:
        raise SystemExit(f"error: {path} holds no records")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def is_eval_series(key: str) -> bool:
    """Held-out evaluation metrics (both stages) exist on the evaluated steps only."""
    return key.startswith("eval_")


def moving_average(ys: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="save_dir(s) or metrics.jsonl file(s)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--keys", nargs="+", default=None, help="metrics to draw (default: the usual ones present)")
    parser.add_argument("--smooth", type=int, default=0, help="also draw a trailing moving average of N steps")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run, read_metrics(run)) for run in args.runs]
    keys = args.keys or [k for k in DEFAULT_KEYS if any(series(recs, k)[0] for _, recs in runs)]
    missing = [k for k in keys if not any(series(recs, k)[0] for _, recs in runs)]
    if missing:
        raise SystemExit(f"error: no run has finite values for {', '.join(missing)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run, recs in runs:
            xs, ys = series(recs, key)
            label = run.name if len(runs) > 1 else None
            if is_eval_series(key):  # a few evaluated steps: a line through markers, each value written
                ax.plot(xs, ys, marker="o", label=label)
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
            else:
                smooth = args.smooth > 1 and key != "lr"  # a schedule is already smooth
                line = ax.plot(xs, ys, alpha=0.35 if smooth else 1.0, label=label)[0]
                if smooth:
                    ax.plot(xs, moving_average(ys, args.smooth), color=line.get_color())
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output} ({len(keys)} panels, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
