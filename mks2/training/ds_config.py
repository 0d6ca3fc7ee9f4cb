"""DeepSpeed config: the JSON template (engine-only knobs) filled with the values our run config owns.

The template (``ds_configs/<mode>.json`` or ``parallel.ds_config``) holds what only DeepSpeed knows
about: bucket sizes, prefetching, loss-scaler tuning, pipeline activation partitioning. Every value that
duplicates the run config -- batch sizes, accumulation, optimizer hyper-parameters, precision,
clipping, ZeRO stage and offload, TensorBoard -- is written here from the run config, so the two can
never disagree; a template value that differs is overwritten and reported in the returned notes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mks2.config import ConfigError, FrozenBase, Offload, ParallelMode, Precision, RunConfig, ds_template
from mks2.training.batch import global_batch_size, grad_accumulation_steps
from mks2.training.ds_template_keys import unknown_template_keys


def template_path(cfg: RunConfig) -> Path:
    """The JSON template a run uses: ``parallel.ds_config`` or the mode's default."""
    par = cfg.parallel
    if par.ds_config:
        return Path(par.ds_config).expanduser()
    if par.mode == ParallelMode.PIPELINE:
        return ds_template("pipeline.json")
    if zero_stage(cfg) < 3:  # frozen_base=replicate (ZeRO-2) or an explicit lower stage
        return ds_template("zero2.json")
    return ds_template("zero3_offload.json" if par.offload != Offload.NONE else "zero3.json")


def load_template(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"parallel.ds_config: DeepSpeed template not found: {path}"])
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"parallel.ds_config: {path}: invalid JSON at line {exc.lineno}: {exc.msg}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"parallel.ds_config: {path}: top level must be a JSON object"])
    problems = unknown_template_keys(data, str(path))
    if problems:
        raise ConfigError(problems, source=str(path))
    return data


def zero_stage(cfg: RunConfig) -> int:
    """``parallel.zero_stage`` if set; else pipeline 1, zero3 3 (2 with ``parallel.frozen_base=replicate``:
    ZeRO-2 keeps every weight whole on every GPU and partitions only gradients and optimizer state)."""
    if cfg.parallel.zero_stage is not None:
        return int(cfg.parallel.zero_stage)
    if cfg.parallel.mode == ParallelMode.PIPELINE:
        return 1
    return 2 if cfg.parallel.frozen_base == FrozenBase.REPLICATE else 3


def build_ds_config(
    cfg: RunConfig, *, data_parallel_size: int, use_torch_adam: bool
) -> tuple[dict[str, Any], list[str]]:
    """Return (DeepSpeed config dict, notes on template values that were overwritten).

    use_torch_adam: build ``torch.optim.AdamW`` instead of DeepSpeed's fused/CPU Adam (no JIT
    compilation; what the CPU path uses when nothing is offloaded).
    """
    path = template_path(cfg)
    ds = copy.deepcopy(load_template(path))
    notes: list[str] = []
    t, par = cfg.train, cfg.parallel

    def put(section: dict, key: str, value: Any, where: str) -> None:
        if key in section and section[key] != value:
            notes.append(f"{path.name}: {where}={section[key]!r} replaced by {value!r} from the run config")
        section[key] = value

    put(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train_micro_batch_size_per_gpu")
    put(
        ds,
        "gradient_accumulation_steps",
        grad_accumulation_steps(cfg, data_parallel_size),
        "gradient_accumulation_steps",
    )
    put(ds, "train_batch_size", global_batch_size(cfg, data_parallel_size), "train_batch_size")
    put(ds, "gradient_clipping", float(t.grad_clip), "gradient_clipping")

    opt_params: dict[str, Any] = {
        "lr": float(t.lr),
        "betas": [float(t.adam_beta1), float(t.adam_beta2)],
        "eps": float(t.adam_eps),
        "weight_decay": float(t.weight_decay),
    }
    if use_torch_adam:
        opt_params["torch_adam"] = True
    old_opt = ds.get("optimizer", {})
    for key, value in opt_params.items():
        old = old_opt.get("params", {}).get(key)
        if old is not None and old != value:
            notes.append(f"{path.name}: optimizer.params.{key}={old!r} replaced by {value!r} from the run config")
    ds["optimizer"] = {"type": "AdamW", "params": {**old_opt.get("params", {}), **opt_params}}
    if "scheduler" in ds:
        notes.append(f"{path.name}: 'scheduler' removed: the schedule is train.warmup_steps/lr/min_lr/max_steps")
        del ds["scheduler"]

    for name, on in (("bf16", t.precision == Precision.BF16), ("fp16", t.precision == Precision.FP16)):
        section = ds.setdefault(name, {})
        put(section, "enabled", on, f"{name}.enabled")

    zero = ds.setdefault("zero_optimization", {})
    put(zero, "stage", zero_stage(cfg), "zero_optimization.stage")
    if par.offload == Offload.NONE:
        for key in ("offload_optimizer", "offload_param"):
            if key in zero and zero[key].get("device", "none") != "none":
                notes.append(f"{path.name}: zero_optimization.{key} dropped: parallel.offload=none")
                zero.pop(key)
    else:
        for key in ("offload_optimizer", "offload_param"):
            section = zero.setdefault(key, {})
            put(section, "device", par.offload.value, f"zero_optimization.{key}.device")
            if par.offload == Offload.NVME:
                put(section, "nvme_path", par.nvme_path, f"zero_optimization.{key}.nvme_path")

    if par.mode == ParallelMode.PIPELINE:
        pipe = ds.setdefault("pipeline", {})
        if "partition" in pipe:  # the stage split is ours: mks2.model.pipeline_layout
            notes.append(
                f"{path.name}: pipeline.partition={pipe.pop('partition')!r} ignored: mks2 spreads the decoder "
                "layers evenly over parallel.pipeline_stages"
            )
        if t.precision == Precision.BF16 and zero_stage(cfg) == 1:
            # 16-32 micro-batches summed in bf16 lose the small ones (8 mantissa bits): accumulate in fp32.
            # DeepSpeed then uses its BF16_Optimizer (fp32 gradient buffers); with ZeRO-0 it has no such path.
            put(ds.setdefault("data_types", {}), "grad_accum_dtype", "fp32", "data_types.grad_accum_dtype")
        put(
            pipe,
            "activation_checkpoint_interval",
            1 if t.activation_checkpointing else 0,
            "pipeline.activation_checkpoint_interval",
        )

    tb = ds.setdefault("tensorboard", {})
    put(tb, "enabled", bool(t.tensorboard), "tensorboard.enabled")
    put(tb, "output_path", str(Path(t.save_dir) / "tensorboard"), "tensorboard.output_path")
    tb.setdefault("job_name", f"stage_{cfg.model.stage.value}")
    csv = ds.setdefault("csv_monitor", {})
    put(csv, "enabled", bool(t.csv), "csv_monitor.enabled")
    put(csv, "output_path", str(Path(t.save_dir) / "csv"), "csv_monitor.output_path")
    csv.setdefault("job_name", f"stage_{cfg.model.stage.value}")
    return ds, notes
