"""Read a DeepSpeed pipeline checkpoint: one ``layer_XX-model_states.pt`` file per LayerSpec.

DeepSpeed's ``PipelineModule`` saves each layer's ``state_dict`` under its global layer index. The
trainer's pipeline layers and their key map have one description, ``mks2.model.pipeline_layout``
(embedding = file 0, decoder layer i = file i + 1, head = file L + 1), the same table the training
LayerSpecs are built from, so every key maps to our parameter name by its layer index. Layer files
hold every parameter of their layer, frozen ones included, in the dtype the pipeline computed in
(the fp32 master copies of a bf16 run live in the optimizer files and are not used). Files are
loaded with ``safe_load`` (weights only, memory-mapped), one file at a time.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mks2.checkpoint.errors import PipelineLayoutError
from mks2.checkpoint.safe_load import safe_load
from mks2.checkpoint.tensors import DEFAULT_REFRESH_BYTES, TensorSource, TensorSpec
from mks2.model.pipeline_layout import PipelineLayout

LAYER_FILE = re.compile(r"^layer_(\d+)-(.*)model_states\.pt$")


def _load(file: Path) -> dict[str, torch.Tensor]:
    state = safe_load(file, map_location="cpu", mmap=True)
    if not isinstance(state, dict):
        raise PipelineLayoutError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def map_layer_key(layout: PipelineLayout, index: int, key: str, file: Path) -> str:
    """Our parameter name of ``key`` in layer file ``index`` (the layout's key map)."""
    if not 0 <= index < len(layout):
        n = layout.num_layers
        raise PipelineLayoutError(f"{file}: layer index {index} is outside 0..{n + 1} for {n} layers")
    layer = layout.layer(index)
    name = layer.model_key(key)
    if name is None:
        raise PipelineLayoutError(
            f"{file}: unexpected key {key!r} for pipeline layer {index} "
            f"(expected keys starting with {', '.join(layer.key_prefixes)})"
        )
    return name


class PipelineSource(TensorSource):
    """Tensors of a pipeline checkpoint directory, by our parameter names (in layer order)."""

    def __init__(self, ckpt_dir: str | Path, *, num_layers: int, refresh_bytes: int = DEFAULT_REFRESH_BYTES):
        self.dir = Path(ckpt_dir)
        self.refresh_bytes = refresh_bytes
        self.description = f"pipeline checkpoint {self.dir}"
        files: dict[int, list[Path]] = {}
        for path in sorted(self.dir.iterdir()):
            m = LAYER_FILE.match(path.name)
            if m:
                files.setdefault(int(m.group(1)), []).append(path)
        if not files:
            raise PipelineLayoutError(f"{self.dir}: no layer_XX-model_states.pt files (not a pipeline checkpoint)")
        several = {i: [p.name for p in ps] for i, ps in files.items() if len(ps) > 1}
        if several:
            raise PipelineLayoutError(
                f"{self.dir}: several files per layer (tensor-parallel pipeline checkpoints are not supported): "
                f"{several}"
            )
        layout = PipelineLayout(num_layers)
        expected = set(range(len(layout)))
        missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
        if missing or extra:
            raise PipelineLayoutError(
                f"{self.dir}: expected layer files 0..{num_layers + 1} for {num_layers} decoder layers "
                f"(embedding, layers, head); missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        self._where: dict[str, tuple[Path, str]] = {}
        self.meta = {}
        for index in sorted(files):
            file = files[index][0]
            state = _load(file)
            for key, tensor in state.items():
                name = map_layer_key(layout, index, key, file)
                if name in self._where:
                    raise PipelineLayoutError(
                        f"{file}: {key!r} maps to {name}, already read from {self._where[name][0]}"
                    )
                self._where[name] = (file, key)
                self.meta[name] = TensorSpec(tuple(tensor.shape), tensor.dtype)
            del state
        self._file: Path | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._touched = 0
        self.reopened = 0

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.dir}: no tensor {name!r} in this checkpoint")
        file, key = self._where[name]
        if file != self._file or self._state is None:
            self._state, self._file = _load(file), file
        tensor = self._state[key]
        self._touched += self.meta[name].nbytes
        if self._touched >= self.refresh_bytes:
            self._state, self._file, self._touched = None, None, 0  # drop the map (and its resident pages)
            self.reopened += 1
        return tensor

    def close(self) -> None:
        self._state = self._file = None
