"""Stage-independent pipeline pieces (``deepspeed.pipe`` LayerSpecs) built from a full MKS2 model.

The tuple passed between stages is ``(hidden [R, S, D], position_ids [R, S], segment_ids [R, S],
*extra)``: ``extra`` are small tensors the last stage needs (stage 1: ``ret_eos_index``), carried
through untouched. The first stage receives ``(input_ids, position_ids, segment_ids,
vision_features, *extra)``; a stage supplies its own head layer and loss callable (``stage1.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from mks2.model import embed_inputs


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


class EmbedPipe(nn.Module):
    """(input_ids, position_ids, segment_ids, vision_features, *extra) -> (hidden, pos, seg, *extra).
    Token embeddings with the image prefixes (the trainable ``vision.mapping`` of
    ``vision_features`` [N, P, F]; N may be 0) spliced at the placeholder positions."""

    def __init__(self, source: ModelSource):
        super().__init__()
        m = source.get()
        self.embed_tokens = m.model.embed_tokens
        self.vision = m.vision  # its frozen towers are not run here (FrozenVision is); ``mapping`` is
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


class DecoderLayerPipe(nn.Module):
    """One decoder layer on the pipeline tuple (hidden, pos, seg, *extra); MoME gates are not needed
    by any loss and are dropped."""

    def __init__(self, source: ModelSource, index: int):
        super().__init__()
        self.layer = source.get().model.layers[index]

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, segment_ids, *extra = inputs
        hidden, _ = self.layer(hidden, position_ids, segment_ids)
        return (hidden, position_ids, segment_ids, *extra)
