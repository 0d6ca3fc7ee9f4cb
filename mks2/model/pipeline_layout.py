"""How an MKS2 model is cut into pipeline layers and stages: the ONE description, free of DeepSpeed.

A model of L decoder layers runs as L + 2 pipeline layers. ``mks2.training.pipeline`` turns each into a
``deepspeed.pipe.LayerSpec`` (one class per kind) that takes the modules named here from the full
model; DeepSpeed saves layer ``index`` as ``layer_{index:02d}-model_states.pt`` holding that pipeline
module's ``state_dict``; ``mks2.checkpoint`` maps those files back to our parameter names with the same
table::

    index    kind      pipeline-module keys           our parameter names
    0        embed     embed_tokens.*, vision.*       model.embed_tokens.*, vision.*
    1..L     decoder   layer.*                        model.layers.{index-1}.*
    L+1      head      norm.*, lm_head.*, retrieval.* model.norm.*, lm_head.*, retrieval.*

The table is on disk in every pipeline checkpoint written so far (file numbers and keys): change it
and those runs can no longer be resumed or exported.

The stage split is ours as well (:meth:`PipelineLayout.stage_bounds`): the decoder layers are spread
as evenly as possible, the first ``L mod P`` stages holding one more; the embedding rides with the
first stage and the head with the last. This is exactly the split DeepSpeed's
``partition_method="type:DecoderLayerPipe"`` produced before (pinned by a test against DeepSpeed's
``partition_balanced``), so ZeRO-1 optimizer files of older runs still match their stage's layers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property


class LayerKind(enum.Enum):
    EMBED = "embed"  # token embedding + image-prefix splice (the vision front-end's trainable mapping)
    DECODER = "decoder"  # one decoder layer
    HEAD = "head"  # final norm + the stage's head(s): LM head, retrieval projection


@dataclass(frozen=True)
class PipelineLayer:
    """One pipeline layer: its global index (= layer file number) and the modules it takes from the model."""

    index: int
    kind: LayerKind
    modules: tuple[tuple[str, str], ...]
    """(attribute on the pipeline module, path of the same module in ``MKS2ForCausalLM``), in state-dict
    order, e.g. ``("layer", "model.layers.3")``: pipeline key ``layer.mlp.up_proj.weight`` is our
    ``model.layers.3.mlp.up_proj.weight``."""
    decoder_index: int | None = None  # i of ``model.layers[i]`` for a decoder layer

    @property
    def key_prefixes(self) -> tuple[str, ...]:
        """The pipeline-module key prefixes this layer may hold, e.g. ``("embed_tokens.", "vision.")``."""
        return tuple(f"{attr}." for attr, _ in self.modules)

    def model_key(self, key: str) -> str | None:
        """Our parameter name of the pipeline-module state-dict ``key``; None if no module of this layer
        holds it."""
        for attr, path in self.modules:
            if key.startswith(f"{attr}."):
                return f"{path}.{key[len(attr) + 1 :]}"
        return None

    def pipe_key(self, name: str) -> str | None:
        """The pipeline-module state-dict key of our parameter ``name``; None if it is not in this layer."""
        for attr, path in self.modules:
            if name.startswith(f"{path}."):
                return f"{attr}.{name[len(path) + 1 :]}"
        return None


EMBED_MODULES = (("embed_tokens", "model.embed_tokens"), ("vision", "vision"))
HEAD_MODULES = (("norm", "model.norm"), ("lm_head", "lm_head"), ("retrieval", "retrieval"))


@dataclass(frozen=True)
class PipelineLayout:
    """The pipeline layers of a model with ``num_layers`` decoder layers (see module docstring)."""

    num_layers: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"a pipeline needs at least one decoder layer, got num_layers={self.num_layers}")

    @cached_property
    def layers(self) -> tuple[PipelineLayer, ...]:
        """All L + 2 layers in pipeline order (index i at position i)."""
        embed = PipelineLayer(0, LayerKind.EMBED, EMBED_MODULES)
        decoders = tuple(
            PipelineLayer(i + 1, LayerKind.DECODER, (("layer", f"model.layers.{i}"),), decoder_index=i)
            for i in range(self.num_layers)
        )
        head = PipelineLayer(self.num_layers + 1, LayerKind.HEAD, HEAD_MODULES)
        return (embed, *decoders, head)

    def __len__(self) -> int:
        return self.num_layers + 2

    def layer(self, index: int) -> PipelineLayer:
        """Pipeline layer ``index``; IndexError outside 0..L+1."""
        if not 0 <= index < len(self):
            raise IndexError(f"pipeline layer {index} is outside 0..{len(self) - 1} for {self.num_layers} layers")
        return self.layers[index]

    def model_key(self, index: int, key: str) -> str | None:
        """Our parameter name of ``key`` in pipeline layer ``index`` (None: no module of that layer holds it)."""
        return self.layer(index).model_key(key)

    def pipe_key(self, name: str) -> tuple[int, str] | None:
        """(pipeline layer index, pipeline-module key) of our parameter ``name``; None if no layer holds it
        (a module the pipeline does not run, e.g. stage 2's unused ``retrieval``, is still mapped)."""
        for layer in self.layers:
            key = layer.pipe_key(name)
            if key is not None:
                return layer.index, key
        return None

    def stage_bounds(self, num_stages: int) -> list[int]:
        """Stage boundaries [P + 1]: stage s holds pipeline layers ``bounds[s] <= index < bounds[s + 1]``.

        L decoder layers over P stages: ``divmod(L, P) = (q, r)``, stages 0..r-1 hold q + 1 decoder layers
        and the others q; layer 0 (embed) joins stage 0, layer L+1 (head) joins stage P-1."""
        if not 1 <= num_stages <= self.num_layers:
            raise ValueError(f"cannot split {self.num_layers} decoder layers over {num_stages} pipeline stages")
        per_stage, extra = divmod(self.num_layers, num_stages)
        bounds, end = [0], 1  # end: one past the last pipeline layer so far (layer 0 is the embedding)
        for stage in range(num_stages):
            end += per_stage + (1 if stage < extra else 0)
            bounds.append(end)
        bounds[-1] = len(self)  # the head joins the last stage
        return bounds

    def stage_layers(self, stage: int, num_stages: int) -> range:
        """Indices of the pipeline layers stage ``stage`` of ``num_stages`` holds."""
        bounds = self.stage_bounds(num_stages)
        return range(bounds[stage], bounds[stage + 1])
