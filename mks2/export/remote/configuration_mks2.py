"""transformers configuration of an exported MKS2 model (``model_type`` ``mks2_llama``).

``config.json`` carries the standard Llama fields (for tools that read them) plus ``mks2``: the run's
``model`` section as a plain dict (``mks2.config.to_dict(cfg)["model"]``), from which the modeling
code rebuilds the exact ``ModelConfig`` the model was trained with. ``vision_subfolder`` names the
folder (inside the model directory) that holds the vision tower's own ``config.json``.
``fused_inference`` (default true): whether no-grad forwards run the fused layers (see
``mks2.export.remote.fused_inference``).
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from transformers import PretrainedConfig

from mks2.config.schema import ModelConfig

MODEL_TYPE = "mks2_llama"


def _enum_of(annotation: Any) -> type[enum.Enum] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"config.json: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        value, annotation = data[name], hints[name]
        if dataclasses.is_dataclass(annotation):
            value = _build(annotation, dict(value or {}), f"{where}.{name}")
        elif (enum_cls := _enum_of(annotation)) is not None and value is not None:
            value = enum_cls(value)
        kwargs[name] = value
    return cls(**kwargs)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A plain-dataclass ``ModelConfig`` from its ``to_dict`` form (enums restored; no omegaconf needed)."""
    return _build(ModelConfig, dict(data), "mks2")


class MKS2LlamaConfig(PretrainedConfig):
    """Configuration of ``MKS2LlamaForCausalLM``. ``mks2``: the run's ``model`` section (plain dict)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        mks2: dict[str, Any] | None = None,
        vision_subfolder: str | None = None,
        fused_inference: bool = True,
        **kwargs: Any,
    ):
        self.mks2 = dict(mks2 or {})
        self.vision_subfolder = vision_subfolder
        self.fused_inference = bool(fused_inference)
        m = self.mks2
        # Mirrors of the architecture, so generic tools (and generation utilities) find the usual names.
        self.vocab_size = m.get("vocab_size")
        self.hidden_size = m.get("hidden_size")
        self.intermediate_size = m.get("intermediate_size")
        self.num_hidden_layers = m.get("num_layers")
        self.num_attention_heads = m.get("num_heads")
        self.num_key_value_heads = m.get("num_kv_heads") or m.get("num_heads")
        self.max_position_embeddings = m.get("max_position_embeddings")
        self.rms_norm_eps = m.get("rms_norm_eps")
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_word_embeddings", False)))
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_dict(self.mks2)
