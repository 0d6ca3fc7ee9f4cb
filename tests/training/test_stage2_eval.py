"""Stage 2's held-out evaluation: ``data.eval_datasets`` of instruction data give the mean answer-token loss
(all, text-only, multimodal) every ``train.eval_interval`` steps in metrics.jsonl, TensorBoard and the plot.

A 2-step run on one process from the session's stage-1 checkpoint, evaluated after each step on two
6-record sets pretokenized here from the demo's raw instruction data.
"""

from __future__ import annotations

import json
import math

from tests.launching import FINETUNE, metrics, python, run, tail
from tests.tiny import STAGE2_ARGS


def _pretokenize(demo_root, tmp_path, name: str, fmt: str, n: int = 6):
    raw = tmp_path / f"{name}.jsonl"
    raw.write_text("".join((demo_root / "raw" / f"{name}.jsonl").read_text().splitlines(keepends=True)[:n]))
    out = tmp_path / name
    result = python("tools/pretokenize.py", "--input", str(raw), "--format", fmt, "--tokenizer",
                    str(demo_root / "tokenizer"), "--image-root", str(demo_root / "images"), "--output", str(out),
                    "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out, json.loads((out / "manifest.json").read_text())["counts"]["loss_tokens"]


def test_stage2_eval_series(tmp_path, stage1_zero3, demo_root):
    text, text_tokens = _pretokenize(demo_root, tmp_path, "text_sft", "alpaca")
    mm, mm_tokens = _pretokenize(demo_root, tmp_path, "mm_sft", "llava")
    save_dir = tmp_path / "run"
    args = [*STAGE2_ARGS, f"model.init_from_stage1={stage1_zero3['save_dir']}",
            f"data.cache_dir={stage1_zero3['cache']}", "train.max_steps=2", "train.eval_interval=1",
            "train.tensorboard=true", f"train.save_dir={save_dir}",
            f"data.eval_datasets=[{{path: {text}}}, {{path: {mm}}}]"]  # fmt: skip
    result = run("python", 1, args, script=FINETUNE)
    assert result.returncode == 0, tail(result)
    assert "unknown inputs or outputs type" not in result.output  # MKS2Output is a dict ZeRO-3's hooks walk

    records = metrics(save_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["eval_answer_tokens"] == text_tokens + mm_tokens  # every answer token of both sets, once
        parts = (r["eval_loss_text"], r["eval_loss_multimodal"])
        assert all(math.isfinite(v) and v > 0 for v in parts)
        weighted = (parts[0] * text_tokens + parts[1] * mm_tokens) / (text_tokens + mm_tokens)
        assert abs(r["eval_loss"] - weighted) < 1e-6  # the mean over all tokens, not of the two means
    assert records[0]["eval_loss"] != records[1]["eval_loss"]  # the model changed in between

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (save_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Eval/loss_multimodal")] == [1, 2]

    png = tmp_path / "plot.png"
    plotted = python("tools/plot_metrics.py", str(save_dir), "--output", str(png))
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert png.stat().st_size > 1000
    assert "panels" in plotted.stdout and "eval_loss" in (save_dir / "logs" / "train.log").read_text()
