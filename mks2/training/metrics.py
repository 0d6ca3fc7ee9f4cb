"""Observability: ``metrics.jsonl`` (one object per optimizer step), the rank-0 progress bar,
TensorBoard events through DeepSpeed's monitor, and the FLOPs / MFU estimate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mks2.fileio import atomic_write_text

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


def train_flops_per_position(llm_params: int, trainable_params: int, num_layers: int, hidden: int, seq: int) -> float:
    """FLOPs per processed token position for one training step: forward 2N, backward through the
    activations 2N (the frozen layers still pass gradients down to the trainable MVMs below), weight
    gradients 2N_trainable, plus attention scores (causal: ~6 L S D over forward + backward).
    The frozen vision towers (forward only, outside the engine) are not counted."""
    return 4.0 * llm_params + 2.0 * trainable_params + 6.0 * num_layers * seq * hidden


class MetricsLog:
    """Rank 0's ``<save_dir>/metrics.jsonl``, the tqdm bar and TensorBoard events."""

    def __init__(
        self,
        save_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        monitor: Any = None,
        log_interval: int = 1,
    ):
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
            events = [
                (f"Train/{k}", float(v), step)
                for k, v in record.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ]
            self.monitor.write_events(events)
        self.bar.update(1)
        if record["step"] % self.log_interval == 0:
            self.bar.set_postfix(
                loss=_fmt(record.get("loss")),
                tok_s=f"{record.get('tokens_per_s', 0):.0f}",
                lr=f"{record.get('lr', 0):.2e}",
                skipped=record.get("skipped_total", 0),
            )

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
