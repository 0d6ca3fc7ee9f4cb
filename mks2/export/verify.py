"""Built-in verification of an export: load it with transformers and compare logits with our model.

On a fixed, seeded batch (two rows, one left-padded; with a vision front-end one image spliced in
through its placeholders):

1. ``reference``: our model (the checkpoint rebuilt by ``load_consolidated``, or the in-memory model)
   in its own dtype, normally fp32.
2. ``exact check``: our model with every weight rounded to the dtype it was exported in (after the
   same LoRA merge, if any), computed in fp32, against the transformers model loaded from the export
   and converted to fp32. Both hold bit-identical weights and compute in fp32, so any difference above
   ``atol`` (1e-4) means the export's weights, config or code differ from ours: verification fails.
   For an fp32 export this is exactly "fp32 logits agree within 1e-4".
3. ``native`` (reported): the transformers model in the exported dtype against the fp32 reference,
   i.e. what running the export in bf16/fp16 costs in precision. Non-finite logits fail.

Only positions that are real tokens (attention mask 1) are compared. Peak memory is about one model
copy in fp32: the reference is freed before transformers loads the export.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mks2.config import Precision, RunConfig, VisionKind
from mks2.errors import UserError
from mks2.model.dtypes import torch_dtype

DEFAULT_ATOL = 1e-4


class VerificationError(UserError, RuntimeError):
    """The exported model does not reproduce ours (message gives the differences)."""


@dataclass
class VerificationReport:
    atol: float
    exact_max_abs_diff: float
    native_max_abs_diff: float
    native_dtype: str
    top1_agreement: float
    positions: int

    @property
    def passed(self) -> bool:
        return self.exact_max_abs_diff <= self.atol

    def summary(self) -> str:
        return (
            f"exported weights in fp32 vs our model: max |diff| {self.exact_max_abs_diff:.3g} (limit {self.atol:g}); "
            f"export run in {self.native_dtype} vs our model in fp32: max |diff| {self.native_max_abs_diff:.3g}, "
            f"top-1 agreement {self.top1_agreement:.1%} over {self.positions} positions"
        )


def verification_batch(cfg: RunConfig, *, seed: int = 1234, length: int = 16) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids [2, S] (row 1 left-padded by 3); with vision, row 0 holds the
    placeholders of one image and pixel_values [1, 3, H, W]."""
    m = cfg.model
    gen = torch.Generator().manual_seed(seed)
    prefix = 0
    batch: dict[str, torch.Tensor] = {}
    if VisionKind(m.vision.kind) != VisionKind.NONE:
        from mks2.model.vision import read_vision_checkpoint

        info = read_vision_checkpoint(m)
        prefix = info.num_prefix_tokens
        batch["pixel_values"] = torch.randn(1, 3, info.image_size, info.image_size, generator=gen)
    s = min(length + prefix, m.max_position_embeddings)
    ids = torch.randint(0, m.vocab_size, (2, s), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if prefix:
        ids[0, 1 : 1 + prefix] = int(m.vision.image_token_id)
    # Explicit positions (restarting after the padding), as generate() computes them: transformers' Llama
    # would otherwise count the padding in.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch.update(input_ids=ids, attention_mask=mask, position_ids=positions)
    return batch


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return out.logits.float()


@torch.no_grad()
def round_to_export(model: nn.Module, export_dtypes: dict[str, torch.dtype]) -> None:
    """Round each weight, in place, to the dtype it was exported in (keeping the model's dtype)."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        dtype = export_dtypes.get(name)
        if dtype is not None and dtype != tensor.dtype and tensor.is_floating_point():
            tensor.data.copy_(tensor.data.to(dtype).to(tensor.dtype))


def load_export(directory: Path, *, llama: bool, dtype: torch.dtype, progress: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    if llama:
        return LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    # Only ever the directory convert() has just written (its code is this package's generated bundle): the
    # user's own directories go through mks2.eval.remote_code's check before any of their code runs.
    return AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True, dtype=dtype).eval()


def verify_export(
    directory: Path,
    reference: nn.Module | Callable[[], nn.Module],
    cfg: RunConfig,
    *,
    export_dtype: Precision,
    export_dtypes: dict[str, torch.dtype],
    llama: bool,
    merge_lora: bool,
    atol: float = DEFAULT_ATOL,
    own_reference: bool = False,
    progress: bool = True,
) -> VerificationReport:
    """Run the checks of the module docstring. ``reference``: our model, or a function building it
    (then it is modified and freed here, before transformers loads the export: one model in memory at
    a time). ``own_reference``: the given model may be modified too (else a copy is rounded).
    Raises VerificationError when the exact check fails."""
    if not isinstance(reference, nn.Module):
        reference, own_reference = reference(), True
    batch = verification_batch(cfg)
    real = batch["attention_mask"].bool()  # [B, S]
    ref_logits = _logits(reference, batch)[real]  # [T, V]
    needs_rounding = merge_lora or any(
        d != t.dtype for n, t in reference.state_dict().items() if (d := export_dtypes.get(n)) is not None
    )
    if needs_rounding:
        rounded = reference if own_reference else copy.deepcopy(reference)
        if merge_lora:
            from mks2.model.lora import merge_lora as merge

            merge(rounded)
        round_to_export(rounded, export_dtypes)
        exact_ref = _logits(rounded, batch)[real]
        del rounded
    else:
        exact_ref = ref_logits
    if own_reference:
        del reference
    gc.collect()

    dtype = torch_dtype(export_dtype)
    hf = load_export(directory, llama=llama, dtype=dtype, progress=progress)
    native = _logits(hf, batch)[real]
    hf.float()
    exact = _logits(hf, batch)[real]
    del hf
    gc.collect()

    if not torch.isfinite(native).all() or not torch.isfinite(exact).all():
        raise VerificationError(f"{directory}: the exported model gives non-finite logits on the verification batch")
    report = VerificationReport(
        atol=atol,
        exact_max_abs_diff=float((exact - exact_ref).abs().max()),
        native_max_abs_diff=float((native - ref_logits).abs().max()),
        native_dtype=str(dtype).removeprefix("torch."),
        top1_agreement=float((native.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        positions=int(real.sum()),
    )
    if not report.passed:
        raise VerificationError(
            f"{directory}: the exported model does not reproduce ours: {report.summary()}. The export is not "
            "trustworthy; please report this with the command you ran."
        )
    return report


def report_dict(report: VerificationReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "atol": report.atol,
        "exact_max_abs_diff": report.exact_max_abs_diff,
        "native_dtype": report.native_dtype,
        "native_max_abs_diff": report.native_max_abs_diff,
        "top1_agreement": report.top1_agreement,
        "positions": report.positions,
    }
