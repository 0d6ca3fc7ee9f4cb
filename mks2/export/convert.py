"""Export a model to a Hugging Face directory: from a training checkpoint or from memory.

    from mks2.export import convert_checkpoint, export_model

    convert_checkpoint("runs/demo_stage1", "hf/demo", dtype="bf16")         # what tools/convert_to_hf.py runs
    export_model(model, cfg, "hf/mine")                                      # an in-memory MKS2ForCausalLM

Both build the directory in a hidden temporary sibling (``mks2.export.atomic``), stream the tensors
one at a time into safetensors shards, write the configs, tokenizer and bundled code, verify the
result by loading it with transformers (``mks2.export.verify``) and only then rename it into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

import mks2
from mks2.checkpoint import (
    ModuleSource,
    TensorSource,
    TensorSpec,
    find_checkpoint,
    load_consolidated,
    open_consolidated,
)
from mks2.config import Precision, RunConfig, Stage, VisionKind
from mks2.export.atomic import atomic_output_dir, check_output
from mks2.export.bundle import write_bundle
from mks2.export.hf_files import (
    copy_vision_files,
    generation_config_json,
    llama_config_json,
    mks2_config_json,
    write_tokenizer,
)
from mks2.export.layout import (
    ExportError,
    ExportFormat,
    choose_format,
    export_config,
    plan_entries,
    precision_of,
    produce,
    target_tensors,
)
from mks2.export.model_card import write_model_card
from mks2.export.peft_adapter import write_peft_adapter
from mks2.export.safetensors_stream import ShardedSafetensorsWriter, parse_size
from mks2.export.verify import DEFAULT_ATOL, VerificationReport, report_dict, verify_export

EXPORT_MANIFEST = "mks2_export.json"


@dataclass
class ExportResult:
    """What an export wrote (also saved as ``mks2_export.json``)."""

    directory: Path
    format: str
    dtype: str
    files: list[str]
    num_tensors: int = 0
    total_bytes: int = 0
    largest_tensor_bytes: int = 0
    verification: VerificationReport | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def _provenance(cfg: RunConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    m = cfg.model
    return {
        "stage": m.stage.value,
        "base_model": m.init_from,
        "stage1_checkpoint": m.init_from_stage1,
        "vision_tower": m.vision.path if VisionKind(m.vision.kind) != VisionKind.NONE else None,
        "tokenizer": cfg.data.tokenizer,
        **(extra or {}),
    }


def write_weights(
    source: TensorSource, cfg: RunConfig, out: Path, *, dtype: Precision, merge_lora: bool, max_shard_bytes: int,
    progress: bool = True,
) -> tuple[RunConfig, dict[str, Any]]:  # fmt: skip
    """Stream every exported tensor of ``source`` into safetensors shards in ``out``.
    Returns the exported model's config and the weights' part of the manifest."""
    ecfg = export_config(cfg, dtype=dtype, merge_lora=merge_lora)
    entries = plan_entries(
        source, target_tensors(ecfg), merge_lora=merge_lora, tied=bool(cfg.model.tie_word_embeddings)
    )
    specs = [(e.name, TensorSpec(e.shape, e.dtype)) for e in entries]
    writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes=max_shard_bytes)
    scaling = float(cfg.model.lora.alpha) / float(cfg.model.lora.rank)
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="writing weights", disable=not progress)
    try:
        for entry, (_, spec) in zip(entries, specs):
            tensor = produce(entry, source, scaling)
            writer.write(entry.name, tensor)
            del tensor
            bar.update(spec.nbytes)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    weights = {
        "files": files,
        "num_tensors": len(specs),
        "total_bytes": writer.total_bytes,
        "largest_tensor_bytes": max((s.nbytes for _, s in specs), default=0),
        "lora_merged_into": sum(e.lora is not None for e in entries),
        "dtypes": {name: str(s.dtype).removeprefix("torch.") for name, s in specs},
    }
    return ecfg, weights


def write_hf_directory(
    source: TensorSource,
    cfg: RunConfig,
    out: Path,
    *,
    dtype: Precision,
    fmt: ExportFormat = ExportFormat.AUTO,
    merge_lora: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExportResult:
    """Everything of a full-model export except verification and the model card, into ``out``."""
    fmt = choose_format(cfg, fmt)
    tokenizer = write_tokenizer(cfg, out)
    ecfg, weights = write_weights(
        source, cfg, out, dtype=dtype, merge_lora=merge_lora, max_shard_bytes=max_shard_bytes, progress=progress
    )
    special = tokenizer.get("special") or {}
    files = list(tokenizer["files"]) + list(weights["files"])
    bundle = {}
    (out / "generation_config.json").write_text(generation_config_json(special, use_cache=True))
    if fmt == ExportFormat.LLAMA:
        (out / "config.json").write_text(llama_config_json(ecfg, special))
    else:
        (out / "config.json").write_text(mks2_config_json(ecfg, special))
        bundle = write_bundle(out)
        files += list(bundle) + copy_vision_files(cfg, out)
    files += ["config.json", "generation_config.json"]
    manifest = {
        "mks2_version": mks2.__version__,
        "format": fmt.value,
        "dtype": dtype.value,
        "merge_lora": merge_lora,
        "provenance": _provenance(cfg, provenance),
        "weights": {k: v for k, v in weights.items() if k != "dtypes"},
        "bundle": bundle,
    }
    return ExportResult(
        directory=out,
        format=fmt.value,
        dtype=dtype.value,
        files=files,
        num_tensors=weights["num_tensors"],
        total_bytes=weights["total_bytes"],
        largest_tensor_bytes=weights["largest_tensor_bytes"],
        manifest={**manifest, "_dtypes": weights["dtypes"], "_export_cfg": ecfg},
    )


def _finish(out: Path, cfg: RunConfig, result: ExportResult, report: VerificationReport | None) -> None:
    """mks2_export.json and README.md (after verification, so both can state its result)."""
    manifest = {k: v for k, v in result.manifest.items() if not k.startswith("_")}
    manifest["verification"] = report_dict(report)
    manifest["files"] = sorted(set(result.files) | {EXPORT_MANIFEST, "README.md"})
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_model_card(out, cfg, export=manifest, verification=manifest["verification"])
    result.verification = report
    result.files = manifest["files"]


def _verify(
    out: Path,
    reference: nn.Module | Callable[[], nn.Module],
    cfg: RunConfig,
    result: ExportResult,
    *,
    merge_lora: bool,
    atol: float,
    own_reference: bool,
    progress: bool = True,
) -> VerificationReport:
    import torch

    dtypes = {n: getattr(torch, d) for n, d in result.manifest["_dtypes"].items()}
    return verify_export(
        out,
        reference,
        cfg,
        export_dtype=Precision(result.dtype),
        export_dtypes=dtypes,
        llama=result.format == ExportFormat.LLAMA.value,
        merge_lora=merge_lora,
        atol=atol,
        own_reference=own_reference,
        progress=progress,
    )


def convert_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    tag: str | None = None,
    dtype: str | Precision | None = None,
    fmt: str | ExportFormat = ExportFormat.AUTO,
    merge_lora: bool = False,
    adapter_only: bool = False,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Convert a training checkpoint (``train.save_dir`` [+ ``tag``]) into a Hugging Face directory.

    ``dtype`` defaults to the run's ``train.precision``. ``adapter_only``: write the stage-2 LoRA
    adapters in PEFT's format instead of the full model. Raises before creating anything when the
    checkpoint is incomplete or the output is non-empty (without ``force``).
    """
    ckpt = find_checkpoint(checkpoint, tag)  # refuses a checkpoint without the completion marker
    cfg = ckpt.config
    precision = precision_of(dtype if dtype is not None else cfg.train.precision)
    max_bytes = parse_size(max_shard_size)
    if adapter_only and merge_lora:
        raise ValueError("--adapter-only and --merge-lora exclude each other (merged adapters are no longer adapters)")
    fmt = choose_format(cfg, fmt)  # fail before writing anything
    export_config(cfg, dtype=precision, merge_lora=merge_lora)
    if adapter_only and Stage(cfg.model.stage) != Stage.MOME:
        raise ExportError(
            f"--adapter-only: a {cfg.model.stage.value}-stage model has no LoRA adapters (stage mome has)"
        )
    out = Path(output)
    check_output(out, force=force)
    prov = {
        "checkpoint": str(ckpt.path.absolute()),
        "tag": ckpt.tag,
        "step": ckpt.step,
        "parallel_mode": ckpt.mode.value,
    }
    log(f"converting {ckpt.path} (stage {cfg.model.stage.value}, {ckpt.mode.value}, step {ckpt.step}) -> {out}")
    with atomic_output_dir(out, force=force) as tmp:
        with open_consolidated(ckpt.path) as source:
            if adapter_only:
                return _adapter(source, cfg, tmp, out, precision, prov, progress)
            result = write_hf_directory(
                source, cfg, tmp, dtype=precision, fmt=fmt, merge_lora=merge_lora, max_shard_bytes=max_bytes,
                provenance=prov, progress=progress,
            )  # fmt: skip
        report = None
        if verify:
            log("verifying: loading the export with transformers and comparing logits with the checkpoint's model")

            def reference() -> nn.Module:  # built inside the verification, which frees it before loading the export
                return load_consolidated(ckpt.path, progress=progress)[1]

            report = _verify(
                tmp, reference, cfg, result, merge_lora=merge_lora, atol=atol, own_reference=True, progress=progress
            )
            log("verification passed: " + report.summary())
        _finish(tmp, cfg, result, report)
    result.directory = out.absolute()
    return result


def _adapter(
    source: TensorSource, cfg: RunConfig, tmp: Path, out: Path, precision: Precision, prov: dict, progress: bool
) -> ExportResult:

    part = write_peft_adapter(source, cfg, tmp, dtype=precision, progress=progress)
    result = ExportResult(directory=out.absolute(), format="peft-lora", dtype=precision.value, files=part["files"])
    result.manifest = {
        "mks2_version": mks2.__version__,
        "format": "peft-lora",
        "dtype": precision.value,
        "merge_lora": False,
        "provenance": _provenance(cfg, prov),
        "adapter": {k: v for k, v in part.items() if k != "files"},
    }
    _finish(tmp, cfg, result, None)
    return result


def export_model(
    model: nn.Module,
    cfg: RunConfig,
    output: str | Path,
    *,
    dtype: str | Precision | None = None,
    fmt: str | ExportFormat = ExportFormat.AUTO,
    merge_lora: bool = False,
    adapter_only: bool = False,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    progress: bool = True,
) -> ExportResult:
    """Export an in-memory ``MKS2ForCausalLM`` built from ``cfg`` (the model is not modified)."""
    precision = precision_of(dtype if dtype is not None else cfg.model.dtype)
    fmt = choose_format(cfg, fmt)
    out = Path(output)
    with atomic_output_dir(out, force=force) as tmp:
        source = ModuleSource(model)
        if adapter_only:
            return _adapter(source, cfg, tmp, out, precision, {}, progress)
        result = write_hf_directory(
            source, cfg, tmp, dtype=precision, fmt=fmt, merge_lora=merge_lora,
            max_shard_bytes=parse_size(max_shard_size), progress=progress,
        )  # fmt: skip
        report = None
        if verify:
            was_training = model.training
            model.eval()
            try:
                report = _verify(
                    tmp, model, cfg, result, merge_lora=merge_lora, atol=atol, own_reference=False, progress=progress
                )
            finally:
                model.train(was_training)
        _finish(tmp, cfg, result, report)
    result.directory = out.absolute()
    return result
