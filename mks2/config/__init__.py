"""Run configuration: the typed schema, YAML + ``key=value`` loading, and one-message validation.

| module | holds |
|---|---|
| ``schema`` | the section dataclasses and enums, each section's rules, ``validate`` (stdlib only) |
| ``loader`` | ``load_config`` / ``config_from_dict`` / ``to_dict`` (OmegaConf) |
| ``errors`` | ``ConfigError``: every problem found, in one message |
| ``bundled`` | the run configs (``configs/``) and DeepSpeed templates (``ds_configs/``) shipped with the package |
| ``reference`` | ``docs/CONFIG.md`` from the fields' docstrings (``python -m mks2.config --reference``) |

Everything public is importable from ``mks2.config``. Code that must not depend on OmegaConf (the
model, the files bundled into exported models) imports ``mks2.config.schema`` instead.
"""

from mks2.config.bundled import bundled_config, ds_template
from mks2.config.errors import ConfigError
from mks2.config.loader import DEMO_CONFIG, config_from_dict, load_config, to_dict
from mks2.config.schema import (
    AttentionBackend,
    ChatTemplate,
    DataConfig,
    DatasetSource,
    FrozenBase,
    KernelBackend,
    LongCaptions,
    LoRAConfig,
    ModelConfig,
    MoMEConfig,
    MVMConfig,
    MVMPlacement,
    Offload,
    ParallelConfig,
    ParallelMode,
    Precision,
    RunConfig,
    SFTData,
    Stage,
    TrainConfig,
    VisionConfig,
    VisionKind,
    validate,
)

__all__ = [
    "DEMO_CONFIG",
    "AttentionBackend",
    "ChatTemplate",
    "ConfigError",
    "DataConfig",
    "DatasetSource",
    "FrozenBase",
    "KernelBackend",
    "LongCaptions",
    "LoRAConfig",
    "MVMConfig",
    "MVMPlacement",
    "ModelConfig",
    "MoMEConfig",
    "Offload",
    "ParallelConfig",
    "ParallelMode",
    "Precision",
    "RunConfig",
    "SFTData",
    "Stage",
    "TrainConfig",
    "VisionConfig",
    "VisionKind",
    "bundled_config",
    "config_from_dict",
    "ds_template",
    "load_config",
    "to_dict",
    "validate",
]
