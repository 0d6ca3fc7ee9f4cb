"""The frozen vision towers of a zero3-mode checkpoint: ``<ckpt>/mks2/vision_towers.safetensors``.

In zero3 mode the towers are not inside the DeepSpeed engine (each rank runs a replicated copy,
``mks2.training.frozen_vision``), so DeepSpeed's files do not hold them. Rank 0 writes them here from its
replica at every save, under our parameter names (``vision.vision_model.*``, ``vision.qformer.*``,
``vision.query_tokens.weight``; the trainable ``vision.mapping.*`` stays in DeepSpeed's files), in the
dtype they ran in (the training dtype, as the engine would have stored them). Every checkpoint stays
self-contained: the consolidating readers (``open_consolidated``: export, ``load_consolidated``, stage 2's
``model.init_from_stage1``) take the towers from this file and the rest from DeepSpeed's.

Zero3 checkpoints written before the towers left the engine have no such file and hold the towers in
DeepSpeed's model-state files; they read as before. Pipeline checkpoints hold them in layer 0's file.

The file is written one tensor at a time (host memory: one tensor, whatever the towers' size) and moved
into place when complete; it is read through a memory map (``safetensors.safe_open``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.layout import CLIENT_DIR
from mks2.checkpoint.tensors import TensorSource, TensorSpec

TOWERS_FILE = "vision_towers.safetensors"
VISION_PREFIX = "vision."

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def towers_file(ckpt_dir: str | Path) -> Path:
    return Path(ckpt_dir) / CLIENT_DIR / TOWERS_FILE


def tower_tensors(front_end: nn.Module) -> dict[str, torch.Tensor]:
    """The towers' parameters and persistent buffers of a vision front-end, under our model names
    (``vision.`` + the front-end's name); ``mapping.*`` (trainable, the engine's) is left out."""
    return {
        VISION_PREFIX + name: t.detach()
        for name, t in front_end.state_dict(keep_vars=True).items()
        if not name.startswith("mapping.")
    }


@torch.no_grad()
def save_towers(ckpt_dir: str | Path, front_end: nn.Module) -> Path:
    """Write the towers of ``front_end`` into checkpoint ``ckpt_dir`` (rank 0). Raises OSError on a failed
    write (the trainer's save turns it into one line for every rank)."""
    tensors = tower_tensors(front_end)
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"vision tower tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    path = towers_file(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():  # one tensor on the host at a time
            host = t.to("cpu").contiguous().reshape(-1)
            f.write(host.view(torch.uint8).numpy().tobytes() if host.numel() else b"")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


class TowerSource(TensorSource):
    """The towers file of a checkpoint, tensor by tensor, under ``prefix`` + our names (``prefix``: what the
    engine's files put before our names, so the names sit with theirs)."""

    def __init__(self, path: Path, prefix: str = ""):
        from safetensors import SafetensorError, safe_open

        self.path = path
        self.description = f"vision towers {path}"
        self._prefix = prefix
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            names = list(self._file.keys())
            self.meta = {}
            for name in names:
                piece = self._file.get_slice(name)
                dtype = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[piece.get_dtype()]
                self.meta[prefix + name] = TensorSpec(tuple(piece.get_shape()), dtype)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a truncated or foreign file
            raise CheckpointError(f"{path}: not a readable vision towers file ({exc})") from exc

    def get(self, name: str) -> torch.Tensor:
        if name not in self.meta:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._file.get_tensor(name[len(self._prefix) :])

    def close(self) -> None:
        self._file = None


def open_towers(ckpt_dir: str | Path, prefix: str = "") -> TowerSource | None:
    """The checkpoint's towers file as a source, or None when it has none (pipeline mode, older zero3)."""
    path = towers_file(ckpt_dir)
    return TowerSource(path, prefix) if path.is_file() else None
