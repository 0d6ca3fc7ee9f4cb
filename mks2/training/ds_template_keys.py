"""The keys a DeepSpeed JSON template may use, so that a typo is an error instead of a silently dropped
section (DeepSpeed reads its config with ``dict.get`` and ignores every key it does not know).

Known top-level keys: the string values of ``deepspeed.runtime.constants`` (where DeepSpeed 0.19.8
defines most of them) plus the sections other DeepSpeed modules read (``EXTRA_TOP_LEVEL``). Known
``zero_optimization`` keys: the fields and aliases of DeepSpeed's own ``DeepSpeedZeroConfig``. Keys
starting with ``_`` are comments and allowed anywhere.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any

EXTRA_TOP_LEVEL = (
    "activation_checkpointing",
    "aio",
    "amp",
    "autotuning",
    "checkpoint_parallel_write_pipeline",
    "comet",
    "comms_logger",
    "compile",
    "compression_training",
    "csv_monitor",
    "curriculum_learning",
    "data_efficiency",
    "eigenvalue",
    "elasticity",
    "expert_parallel",
    "flops_profiler",
    "graph_harvesting",
    "hybrid_engine",
    "load_universal_checkpoint",
    "nebula",
    "pipeline",
    "progressive_layer_drop",
    "quantize_training",
    "sequence_parallel_size",
    "sparse_attention",
    "sparse_gradients",
    "tensor_parallel",
    "tensorboard",
    "timers",
    "wandb",
    "weight_quantization",
    "zero_optimization",
)
_KEY = re.compile(r"[a-z][a-z0-9_]*")


@functools.cache
def top_level_keys() -> frozenset[str]:
    from deepspeed.runtime import constants

    found = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and _KEY.fullmatch(v)}
    return frozenset(found | set(EXTRA_TOP_LEVEL))


@functools.cache
def zero_keys() -> frozenset[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    names: set[str] = set()
    for name, field in DeepSpeedZeroConfig.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return frozenset(names)


def _unknown(section: dict[str, Any], known: frozenset[str], where: str, path: str) -> list[str]:
    problems = []
    for key in section:
        if key.startswith("_") or key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"parallel.ds_config: {path}: unknown {where}key {key!r}{hint}")
    return problems


def unknown_template_keys(template: dict[str, Any], path: str) -> list[str]:
    """One problem line per unknown top-level or ``zero_optimization`` key, each naming the closest
    known key."""
    problems = _unknown(template, top_level_keys(), "", path)
    zero = template.get("zero_optimization")
    if isinstance(zero, dict):
        problems += _unknown(zero, zero_keys(), "zero_optimization ", path)
    return problems
