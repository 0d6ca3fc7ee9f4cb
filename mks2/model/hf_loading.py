"""Load a local Hugging Face Llama directory into an MKS2 model, tensor by tensor.

- ``apply_config_from_hf(cfg, path)`` copies the architecture from ``config.json`` into ``cfg.model``
  (both the transformers-4 keys ``rope_theta``/``rope_scaling`` and transformers-5's
  ``rope_parameters`` are understood) and re-validates the config.
- ``load_hf_llama(model, path, weight_gather=None)`` streams ``model.safetensors`` /
  ``pytorch_model.bin`` (sharded through an index json or not) into the LLM parameters of an
  already-built model: one checkpoint tensor at a time (``safe_open``, or for ``.bin``
  ``torch.load(file, weights_only=True, mmap=True)``), so at most one model copy plus one tensor is
  ever in memory. All key
  mismatches are reported before anything is copied; each error names the tensor and the file.

``weight_gather`` is an optional ``params -> context manager`` opened around each copy (the trainer
passes DeepSpeed's ``GatheredParameters`` under ZeRO-3: the parameter holds its full shape only inside
the context, so shapes are checked there). This file imports no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mks2.config.errors import ConfigError
from mks2.config.schema import RunConfig, validate
from mks2.errors import UserError, name_mismatch
from mks2.model.rope import normalize_rope_scaling

WeightGather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Checkpoint keys that are not weights: old transformers versions saved the rotary buffers.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Name prefixes/fragments of parameters that do not come from an HF Llama checkpoint.
_NON_LLAMA = (".mvm.", ".router.", "lora_A", "lora_B")
_NON_LLAMA_PREFIXES = ("vision.", "retrieval.")


class HFCheckpointError(UserError, ValueError):
    """A Hugging Face model directory (``model.init_from``, ``model.vision.path``) cannot be read into the model (names
    tensors and files). Not ``mks2.checkpoint.CheckpointError``: that one is about the trainer's own
    checkpoints, in a package above the model."""


def _gather(weight_gather: WeightGather | None, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    return weight_gather(params) if weight_gather is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def read_hf_llama_config(path: str | Path) -> dict[str, Any]:
    """The ``model.*`` architecture fields described by ``path/config.json``.

    Raises ValueError naming the file and key when the checkpoint is not a Llama we can represent.
    """
    path = Path(path).expanduser()
    file = path / "config.json"
    if not path.is_dir():
        raise HFCheckpointError(f"model.init_from: directory {path} does not exist")
    if not file.is_file():
        raise HFCheckpointError(
            f"model.init_from: {path} has no config.json (expected a transformers Llama checkpoint)"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{file}: not valid JSON ({exc})") from exc

    problems = []
    if raw.get("model_type") != "llama":
        problems.append(f"model_type is {raw.get('model_type')!r}, expected 'llama'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(raw.get(key), int):
            problems.append(f"{key} missing or not an integer (got {raw.get(key)!r})")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {raw['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            problems.append(f"{key}=true is not supported (Llama-2 has no biases)")
    heads = raw.get("num_attention_heads")
    if isinstance(heads, int) and isinstance(raw.get("hidden_size"), int):
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim != raw["hidden_size"] // heads:
            problems.append(f"head_dim={head_dim} differs from hidden_size/num_attention_heads; not supported")

    rope_params = dict(raw.get("rope_parameters") or {})
    theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling_src = raw.get("rope_scaling") or rope_params or None
    try:
        scaling = normalize_rope_scaling(scaling_src)
    except ValueError as exc:
        problems.append(str(exc))
        scaling = None
    if problems:
        raise HFCheckpointError(f"{file}: cannot load as an MKS2 Llama:\n" + "\n".join(f"  - {p}" for p in problems))

    return {
        "vocab_size": raw["vocab_size"],
        "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"],
        "num_layers": raw["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": raw.get("num_key_value_heads") or heads,
        "max_position_embeddings": raw.get("max_position_embeddings", 4096),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
    }


def apply_config_from_hf(cfg: RunConfig, path: str | Path) -> RunConfig:
    """Set ``cfg.model``'s architecture fields from ``path/config.json`` (in place) and re-validate.

    The checkpoint wins over the YAML: a Llama-2-13B directory gives a 13B model whatever the config
    said. Returns ``cfg``; raises ConfigError if the result is inconsistent (e.g. ``model.mvm``
    settings that do not fit the checkpoint's widths).
    """
    for key, value in read_hf_llama_config(path).items():
        setattr(cfg.model, key, value)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems, source=f"config after reading the architecture from {Path(path) / 'config.json'}")
    return cfg


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def checkpoint_index(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of an HF checkpoint directory to the file holding it (headers only).

    Prefers safetensors over .bin when both exist (as transformers does).
    """
    path = Path(path).expanduser()
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFCheckpointError(f"{index}: not a valid shard index ({exc})") from exc
            out = {key: path / name for key, name in weight_map.items()}
            absent = sorted({str(f) for f in out.values() if not f.is_file()})
            if absent:
                raise HFCheckpointError(f"{index}: lists shard file(s) that do not exist: {', '.join(absent)}")
            return out
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        file = path / single
        if file.is_file():
            return {key: file for key in _file_keys(file)}
    raise HFCheckpointError(
        f"{path}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:  # mmap: tensors are paged in on use, a multi-GB shard is not read into RAM up front
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _file_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as reader:
            return list(reader.keys())
    return list(_load_bin(file).keys())


def _iter_file(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for ``keys`` of one file, one tensor at a time."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in keys:
                yield key, reader.get_tensor(key)
        return
    state = _load_bin(file)
    for key in keys:
        yield key, state.pop(key)
    del state


def llama_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an HF Llama checkpoint provides, by their (HF-identical) names."""
    return {
        name: p
        for name, p in model.named_parameters()
        if not any(tag in name for tag in _NON_LLAMA) and not name.startswith(_NON_LLAMA_PREFIXES)
    }


def load_hf_llama(
    model: nn.Module, path: str | Path, *, weight_gather: WeightGather | None = None, progress: bool = True
) -> list[str]:
    """Copy the weights of the HF Llama checkpoint at ``path`` into ``model`` (an ``MKS2ForCausalLM``).

    Returns the loaded parameter names. Raises HFCheckpointError naming every missing, unexpected or
    mis-shaped tensor (with its file); missing/unexpected keys are detected before any copy.
    """
    path = Path(path).expanduser()
    index = checkpoint_index(path)
    params = llama_parameters(model)
    tied = bool(getattr(model, "tie_word_embeddings", False))
    # With tied embeddings the head IS the embedding; a checkpoint may still carry a copy of it.
    optional = {"lm_head.weight"} if tied else set()

    unexpected = sorted(
        f"{k} (in {index[k].name})"
        for k in index
        if k not in params and k not in optional and not k.endswith(_IGNORED_SUFFIXES)
    )
    missing = sorted(n for n in params if n not in index)
    if unexpected or missing:
        raise HFCheckpointError(f"{path} does not match the model:\n" + name_mismatch(missing, unexpected))

    by_file: dict[Path, list[str]] = {}
    for key in params:
        by_file.setdefault(index[key], []).append(key)
    loaded = []
    bar = tqdm(total=len(params), desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False)
    for file, keys in by_file.items():
        for key, tensor in _iter_file(file, keys):
            param = params[key]
            with _gather(weight_gather, [param]), torch.no_grad():
                if tuple(param.shape) != tuple(tensor.shape):
                    raise HFCheckpointError(
                        f"{file}: tensor {key} has shape {tuple(tensor.shape)} but the model expects "
                        f"{tuple(param.shape)} (does config.json match the weights?)"
                    )
                param.copy_(tensor)
            del tensor
            loaded.append(key)
            bar.update()
    bar.close()
    return loaded
