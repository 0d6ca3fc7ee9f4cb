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
passes DeepSpeed's ``GatheredParameters`` under ZeRO-3). This file imports no DeepSpeed.

What is read, and by whom (start-up must scale with the node, not the model):
- safetensors tensors are read with ``readinto`` straight into the parameter's memory (no memory map, no
  second copy; a parameter in another dtype or on an accelerator goes through one tensor-sized buffer);
- parameters on the meta device (another pipeline stage's layers, ``build_model(keep=...)``) are
  neither read nor loaded: a pipeline rank reads only its own stage's tensors;
- ``read=False`` (ZeRO-3 ranks other than 0) reads headers only: names and shapes are checked on every
  rank alike (so a bad checkpoint stops all ranks together, before any gather), then the rank walks the
  same gathers without touching the data; rank 0's values are what ``GatheredParameters(modifier_rank=0)``
  partitions.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor lies in a ``.safetensors`` file: ``nbytes`` bytes from absolute offset ``start``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def safetensors_header(file: Path) -> dict[str, SafetensorsEntry]:
    """The tensors of a ``.safetensors`` file (8-byte little-endian header length, JSON header, data)."""
    try:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 << 20:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
        base = 8 + length
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            out[name] = SafetensorsEntry(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + begin,
                                         end - begin)  # fmt: skip
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise HFCheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc


def read_safetensors_into(file: Path, entry: SafetensorsEntry, out: torch.Tensor) -> None:
    """Read one tensor of ``file`` into ``out`` (same shape). A contiguous CPU ``out`` of the stored dtype
    is filled in place from the file; otherwise through one buffer of the tensor's size."""
    direct = out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
    target = out if direct else torch.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    if len(view) != entry.nbytes:
        raise HFCheckpointError(f"{file}: a tensor holds {entry.nbytes} bytes, {len(view)} expected for {entry.shape}")
    with open(file, "rb", buffering=0) as fh:
        fh.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            n = fh.readinto(view[done:])
            if not n:
                raise HFCheckpointError(f"{file}: ends inside a tensor (truncated?)")
            done += n
    if not direct:
        out.copy_(target)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:  # mmap: tensors are paged in on use, a multi-GB shard is not read into RAM up front
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _file_keys(file: Path) -> list[str]:
    return list(_file_shapes(file))


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one checkpoint file, without reading tensor data (safetensors: the header;
    ``.bin``: the memory-mapped pickle)."""
    if file.suffix == ".safetensors":
        return {k: e.shape for k, e in safetensors_header(file).items()}
    return {k: tuple(t.shape) for k, t in _load_bin(file).items()}


def _iter_file(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for ``keys`` of one file, one tensor at a time (each a fresh CPU tensor)."""
    if file.suffix != ".safetensors":
        yield from _iter_bin(file, keys)
        return
    entries = safetensors_header(file)
    for key in keys:
        entry = entries[key]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        read_safetensors_into(file, entry, tensor)
        yield key, tensor


def _iter_bin(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for ``keys`` of one ``.bin`` file, one tensor at a time."""
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


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the full shape of a partitioned parameter


def load_hf_llama(
    model: nn.Module,
    path: str | Path,
    *,
    weight_gather: WeightGather | None = None,
    progress: bool = True,
    read: bool = True,
) -> list[str]:
    """Copy the weights of the HF Llama checkpoint at ``path`` into ``model`` (an ``MKS2ForCausalLM``).

    Returns the names of the parameters loaded (or, with ``read=False``, walked) here: meta-device
    parameters are skipped. Raises HFCheckpointError naming every missing, unexpected or mis-shaped tensor
    (with its file), before any copy and on every rank alike (headers only). ``read=False``: open the
    ``weight_gather`` contexts in the same order without reading any tensor (see module docstring).
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

    local = {k: p for k, p in params.items() if not p.is_meta}  # meta: another pipeline stage's
    by_file: dict[Path, list[str]] = {}
    for key in local:
        by_file.setdefault(index[key], []).append(key)
    for file, keys in by_file.items():
        shapes = _file_shapes(file)
        for key in keys:
            if shapes[key] != _shape(local[key]):
                raise HFCheckpointError(
                    f"{file}: tensor {key} has shape {shapes[key]} but the model expects "
                    f"{_shape(local[key])} (does config.json match the weights?)"
                )
    loaded = []
    bar = tqdm(total=len(local), desc=f"loading {path.name}", unit="tensor", disable=not progress, leave=False)
    for file, keys in by_file.items():
        entries = safetensors_header(file) if read and file.suffix == ".safetensors" else None
        tensors = _iter_bin(file, keys) if read and entries is None else None
        for key in keys:
            param = local[key]
            with _gather(weight_gather, [param]), torch.no_grad():
                if entries is not None:
                    read_safetensors_into(file, entries[key], param.data)
                elif tensors is not None:
                    _, tensor = next(tensors)
                    param.copy_(tensor)
                    del tensor
            loaded.append(key)
            bar.update()
    bar.close()
    return loaded
