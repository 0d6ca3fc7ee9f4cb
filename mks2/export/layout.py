"""What an export contains: its format, the exported model's config, and every tensor to write.

Formats:

- ``llama``: a plain transformers ``LlamaForCausalLM`` directory (no remote code). Only a ``base``
  stage model without a vision front-end computes exactly a Llama; its parameter names already are
  transformers' names.
- ``mks2``: our own ``model_type`` with the modeling code bundled (``trust_remote_code``); any stage.
- ``auto``: ``llama`` when possible, else ``mks2``.

Each exported tensor is read from the source under the same name and converted to the export dtype
(per tensor: the dtype the exported model allocates it in, so BLIP-2's Q-Former stays fp32).
``merge_lora`` folds each adapter into its base weight, ``W + (alpha / r) * B @ A`` in fp32, exactly
as ``mks2.model.merge_lora`` does, and the exported config then has no LoRA targets.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

import torch

from mks2.checkpoint import TensorSource, TensorSpec, build_empty_model, tensor_specs
from mks2.config import Precision, RunConfig, Stage, VisionKind
from mks2.errors import UserError
from mks2.model.decoder import torch_dtype


class ExportFormat(str, enum.Enum):
    AUTO = "auto"
    LLAMA = "llama"
    MKS2 = "mks2"


class ExportError(UserError, ValueError):
    """The requested export is impossible for this model (the message says why and what to use)."""


def choose_format(cfg: RunConfig, requested: ExportFormat | str) -> ExportFormat:
    requested = ExportFormat(requested)
    m = cfg.model
    plain = Stage(m.stage) == Stage.BASE and VisionKind(m.vision.kind) == VisionKind.NONE
    if requested == ExportFormat.AUTO:
        return ExportFormat.LLAMA if plain else ExportFormat.MKS2
    if requested == ExportFormat.LLAMA and not plain:
        why = (
            f"stage {m.stage.value} adds MVM/MoME experts"
            if Stage(m.stage) != Stage.BASE
            else f"it has a {m.vision.kind.value} vision front-end"
        )
        raise ExportError(f"--format llama: this model is not a plain Llama ({why}); use --format mks2 (or auto)")
    return requested


def export_config(cfg: RunConfig, *, dtype: Precision, merge_lora: bool) -> RunConfig:
    """The run config describing the exported model: ``model.dtype`` = export dtype; after
    ``merge_lora`` no LoRA targets (the adapters live in the weights)."""
    out = copy.deepcopy(cfg)
    out.model.dtype = dtype
    if merge_lora:
        if Stage(cfg.model.stage) != Stage.MOME:
            raise ExportError(
                f"--merge-lora: a {cfg.model.stage.value}-stage model has no LoRA adapters (stage mome has)"
            )
        out.model.lora.targets = []
    return out


@dataclass(frozen=True)
class ExportEntry:
    """One tensor of the export: written as ``name`` [shape] in ``dtype``, from source tensor
    ``source``, plus ``(alpha / r) * B @ A`` when ``lora`` names (A, B)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    lora: tuple[str, str] | None = None


def plan_entries(
    source: TensorSource, target: dict[str, TensorSpec], *, merge_lora: bool, tied: bool
) -> list[ExportEntry]:
    """Entries for every target tensor, in the source's read order. Raises ExportError when the
    source lacks a target tensor or holds tensors the export would silently drop."""
    entries = []
    used: set[str] = set()
    for name in source.meta:
        if name not in target:
            continue
        meta = target[name]
        lora = None
        if merge_lora and name.endswith(".weight"):
            base = name[: -len(".weight")]
            a, b = f"{base}.lora_A", f"{base}.lora_B"
            if a in source.meta and b in source.meta:
                lora = (a, b)
                used |= {a, b}
        entries.append(ExportEntry(name=name, shape=meta.shape, dtype=meta.dtype, source=name, lora=lora))
        used.add(name)
    missing = sorted(set(target) - used)
    ignorable = {"lm_head.weight"} if tied else set()
    dropped = sorted(set(source.meta) - used - ignorable)
    if missing or dropped:
        raise ExportError(
            f"{source.description}: tensors do not match the export ("
            + "; ".join(
                x
                for x in (
                    f"missing: {', '.join(missing[:8])}" if missing else "",
                    f"would be dropped: {', '.join(dropped[:8])}" if dropped else "",
                )
                if x
            )
            + ")"
        )
    for e in entries:
        if source.meta[e.source].shape != e.shape:
            raise ExportError(
                f"{source.description}: {e.name} has shape {source.meta[e.source].shape}, expected {e.shape}"
            )
    return entries


@torch.no_grad()
def produce(entry: ExportEntry, source: TensorSource, lora_scaling: float) -> torch.Tensor:
    """The exported tensor of one entry (reads 1 tensor, or 3 with a LoRA merge)."""
    tensor = source.get(entry.source)
    if entry.lora is not None:
        a, b = (source.get(n).float() for n in entry.lora)  # A [r, in], B [out, r]
        tensor = tensor.float() + (b @ a) * lora_scaling
    return tensor.to(entry.dtype)


def target_tensors(export_cfg: RunConfig) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of the exported model (built on the meta device: no memory)."""
    return tensor_specs(build_empty_model(export_cfg, device="meta"))


def precision_of(dtype: str | torch.dtype | Precision) -> Precision:
    """``bf16``/``fp16``/``fp32`` (or a torch dtype) -> Precision."""
    if isinstance(dtype, torch.dtype):
        for p in Precision:
            if torch_dtype(p) == dtype:
                return p
        raise ExportError(f"unsupported export dtype {dtype}")
    try:
        return Precision(getattr(dtype, "value", dtype))
    except ValueError as exc:
        raise ExportError(f"--dtype: expected bf16, fp16 or fp32, got {dtype!r}") from exc
