"""The pipeline split of either stage as ``deepspeed.pipe`` LayerSpecs, built from the model's
:class:`~mks2.model.pipeline_layout.PipelineLayout` (the layer list, key map and stage split).

One module class per layer kind: :class:`EmbedPipe` (index 0), :class:`DecoderLayerPipe` (1..L) and
the stage's own head, a :class:`HeadPipe` subclass (L+1). Each takes from the full model exactly the
modules its layout layer names, under the layout's attribute names, so its ``state_dict`` keys are the
layout's pipeline keys (what DeepSpeed writes into ``layer_XX-model_states.pt``).

The tuple passed between stages is ``(hidden [R, S, D], position_ids [R, S], segment_ids [R, S],
*extra)``: ``extra`` are small tensors the head needs, carried through untouched (stage 1: ``ret_eos_index``
[B] in the padded layout, and the frozen image embedding as int32 bits, which is how the retrieval target
reaches the last stage without a tower there and without a gradient; stage 2: none). The first stage
receives ``(input_ids, position_ids, segment_ids, vision_features, *extra)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mks2.model import embed_inputs
from mks2.model.pipeline_layout import LayerKind, PipelineLayer, PipelineLayout


class ModelSource:
    """Hands the modules of a fully built model to the LayerSpecs of this rank's pipeline stage.
    ``release()`` drops the reference afterwards, so the layers of other stages are freed."""

    def __init__(self, model: nn.Module):
        self.model: nn.Module | None = model

    def get(self) -> nn.Module:
        assert self.model is not None, "ModelSource used after release()"
        return self.model

    def release(self) -> None:
        self.model = None


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    """``model``'s submodule at dotted ``path``; None where the model has the slot empty (e.g. ``vision``
    of a text-only model)."""
    module: Any = model
    for part in path.split("."):
        module = getattr(module, part)
        if module is None:
            return None
    return module


class LayoutPipe(nn.Module):
    """A pipeline module that holds the modules its layout layer names (``layer.modules``), under the
    layout's attribute names. ``takes`` limits them to a subset (a head that has no retrieval rows)."""

    takes: tuple[str, ...] | None = None

    def __init__(self, source: ModelSource, layer: PipelineLayer):
        super().__init__()
        model = source.get()
        for attr, path in layer.modules:
            if self.takes is None or attr in self.takes:
                setattr(self, attr, _module_at(model, path))


class EmbedPipe(LayoutPipe):
    """(input_ids, position_ids, segment_ids, vision_features, *extra) -> (hidden, pos, seg, *extra).
    Token embeddings with the image prefixes (the trainable ``vision.mapping`` of
    ``vision_features`` [N, P, F]; N may be 0) spliced at the placeholder positions."""

    embed_tokens: nn.Module
    vision: nn.Module | None  # its frozen towers are not run here (FrozenVision is); ``mapping`` is

    def __init__(self, source: ModelSource, layer: PipelineLayer):
        super().__init__(source, layer)
        m = source.get()
        self.vocab_size = m.vocab_size
        self.image_token_id = m.image_token_id

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, segment_ids, vision_features, *extra = inputs
        hidden = embed_inputs(
            input_ids,
            embed_tokens=self.embed_tokens,
            vocab_size=self.vocab_size,
            image_token_id=self.image_token_id,
            vision=self.vision,
            vision_features=vision_features if self.vision is not None else None,
        )  # [R, S, D]
        return (hidden, position_ids, segment_ids, *extra)


class DecoderLayerPipe(LayoutPipe):
    """One decoder layer (MoME where the layer has an MVM) on the pipeline tuple (hidden, pos, seg,
    *extra); MoME gates are not needed by any loss and are dropped. The only kind DeepSpeed's activation
    checkpointing wraps (``pipeline_module.py``)."""

    layer: nn.Module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, segment_ids, *extra = inputs
        hidden, _ = self.layer(hidden, position_ids, segment_ids)
        return (hidden, position_ids, segment_ids, *extra)


class HeadPipe(LayoutPipe):
    """Base of a stage's last pipeline layer (final norm + heads); the stage defines ``forward`` and, via
    ``takes``, which of the layout's head modules it holds."""

    norm: nn.Module
    lm_head: nn.Module


@dataclass
class PipelineSpec:
    """A stage's pipeline split, ready for the engine's ``PipelineModule``."""

    layout: PipelineLayout
    layers: list[Any]  # deepspeed.pipe.LayerSpec per layout layer, in order
    loss_fn: Callable[[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]], torch.Tensor]
    """The last stage's loss: (head outputs, labels tuple) -> 0-d loss; it also records the step's metrics."""
    release: Callable[[], None]
    """Drops the full model once the PipelineModule has built this rank's layers (frees the others)."""


def build_pipeline_spec(
    model: nn.Module, *, head: type[HeadPipe], loss_fn: Callable[..., torch.Tensor]
) -> PipelineSpec:
    """LayerSpecs of ``model``'s layout: :class:`EmbedPipe`, one :class:`DecoderLayerPipe` per decoder
    layer, then the stage's ``head``. Nothing is built yet: each rank builds only its stage's layers."""
    from deepspeed.pipe import LayerSpec

    layout = PipelineLayout(num_layers=len(model.model.layers))
    source = ModelSource(model)
    classes: dict[LayerKind, type[LayoutPipe]] = {
        LayerKind.EMBED: EmbedPipe,
        LayerKind.DECODER: DecoderLayerPipe,
        LayerKind.HEAD: head,
    }
    layers = [LayerSpec(classes[layer.kind], source, layer) for layer in layout.layers]
    return PipelineSpec(layout=layout, layers=layers, loss_fn=loss_fn, release=source.release)
