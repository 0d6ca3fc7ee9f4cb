"""``deepspeed.pipe.PipelineModule`` split by our layout instead of by DeepSpeed's class-name matching.

DeepSpeed 0.19 picks a stage's layers in ``PipelineModule._partition_layers`` (from ``partition_method``:
``"type:<regex over class names>"``, ``"parameters"``, ``"uniform"``) and the layers its activation
checkpointing wraps in ``_is_checkpointable`` (``checkpointable_layers``: class names). Both hooks are
overridden here: the stage bounds come from :meth:`PipelineLayout.stage_bounds`, and only
:class:`~mks2.training.pipeline.DecoderLayerPipe` instances are checkpointed.
"""

from __future__ import annotations

import logging
from typing import Any

from deepspeed.pipe import PipelineModule
from torch import nn

from mks2.model.pipeline_layout import PipelineLayout
from mks2.training.pipeline import DecoderLayerPipe

log = logging.getLogger("mks2.training")

_HOOKS = ("_partition_layers", "_is_checkpointable", "_set_bounds")
if not all(hasattr(PipelineModule, hook) for hook in _HOOKS):  # a DeepSpeed that renamed them would split silently
    raise ImportError(f"deepspeed.pipe.PipelineModule lacks {', '.join(_HOOKS)}: this DeepSpeed is not supported")


class LayoutPipelineModule(PipelineModule):
    """A PipelineModule whose layers are ``layout``'s (one LayerSpec each, in order); other keyword
    arguments go to ``PipelineModule`` (``partition_method`` and ``checkpointable_layers`` are ours)."""

    def __init__(self, *, layout: PipelineLayout, layers: list[Any], **kwargs: Any):
        if len(layers) != len(layout):
            raise ValueError(f"{len(layers)} LayerSpecs for a layout of {len(layout)} pipeline layers")
        self._layout = layout  # before PipelineModule.__init__, which calls _partition_layers
        super().__init__(layers=layers, **kwargs)
        assert self.parts == layout.stage_bounds(self.num_stages), "PipelineModule did not use our stage split"

    def _partition_layers(self, method: str = "") -> None:
        """Stage bounds from the layout; ``method`` (DeepSpeed's ``partition_method``) is not used."""
        self.parts = self._layout.stage_bounds(self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        if self.global_rank == 0:
            for s in range(self.num_stages):
                log.info("pipeline stage %d: layers %d..%d", s, self.parts[s], self.parts[s + 1] - 1)
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _is_checkpointable(self, funcs: list[nn.Module]) -> bool:
        """A run of layers is activation-checkpointed only when it is all decoder layers."""
        return all(isinstance(f, DecoderLayerPipe) for f in funcs)
