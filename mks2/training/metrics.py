"""Observability: ``metrics.jsonl`` (one object per optimizer step), the rank-0 progress bar,
TensorBoard / CSV events through DeepSpeed's monitor, the W&B run (``mks2.training.monitoring``), and the
peak FLOP/s that MFU divides by (the FLOPs that ran: ``mks2.training.flops``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mks2.fileio import atomic_write_text
from mks2.training.monitoring import WandbRun, numeric_items
from mks2.training.run_log import log_to_file
from mks2.training.summary import time_estimate

ESTIMATE_AFTER_STEPS = 5  # steps timed before the time-left estimate is printed

# Dense peak TFLOP/s per device by (name fragment, precision); fp32 uses TF32 tensor cores.
_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_flops_per_device(precision: str) -> float | None:
    """Peak FLOP/s of one accelerator: ``MKS2_PEAK_TFLOPS`` if set, else a table of common GPUs;
    None on CPU or an unknown device (then no MFU is reported)."""
    if os.environ.get("MKS2_PEAK_TFLOPS"):
        return float(os.environ["MKS2_PEAK_TFLOPS"]) * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in _PEAK_TFLOPS.items():
        if key in name and table.get(precision):
            return table[precision] * 1e12
    return None


class MetricsLog:
    """Rank 0's ``<save_dir>/metrics.jsonl``, the tqdm bar, DeepSpeed's monitor (TensorBoard, CSV) and
    the W&B run (``wandb``: a :class:`WandbRun`, or None)."""

    def __init__(
        self,
        save_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        monitor: Any = None,
        log_interval: int = 1,
        wandb: WandbRun | None = None,
    ):
        self.wandb = wandb if enabled else None
        self.total_steps = total_steps
        self._step_times: list[float] = []  # the first steps of this start, for the time estimate
        self.log_interval = log_interval
        self.path = Path(save_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
        )
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they are recomputed), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.monitor is not None:
            step = record["step"]
            self.monitor.write_events([(_event_tag(k), v, step) for k, v in numeric_items(record).items()])
        if self.wandb is not None:
            self.wandb.log(record)
        self.bar.update(1)
        if len(self._step_times) < ESTIMATE_AFTER_STEPS and "step_time_s" in record:
            self._step_times.append(float(record["step_time_s"]))
            left = self.total_steps - record["step"]
            if len(self._step_times) == ESTIMATE_AFTER_STEPS and left > 0:
                self.message(time_estimate(self._step_times, left))
        if record["step"] % self.log_interval == 0:
            log_to_file(
                f"step {record['step']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "step")
            )
            self.bar.set_postfix(bar_fields(record))

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)
            log_to_file(text)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def bar_fields(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix: loss, real tokens/s, padding share, MFU (when known), lr, skipped."""
    fields = {
        "loss": _fmt(record.get("loss")),
        "tok_s": f"{record.get('tokens_per_s', 0):.0f}",
        "pad": f"{record.get('padding_fraction', 0):.0%}",
    }
    if "mfu" in record:
        fields["mfu"] = f"{record['mfu']:.1%}"
    fields["lr"] = f"{record.get('lr', 0):.2e}"
    fields["skipped"] = str(record.get("skipped_total", 0))
    return fields


def _event_tag(key: str) -> str:
    """TensorBoard / CSV tag: held-out evaluation in its own section (``Eval/loss``), the rest ``Train/``."""
    return f"Eval/{key[5:]}" if key.startswith("eval_") else f"Train/{key}"


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)
