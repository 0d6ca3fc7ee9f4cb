"""The frozen vision towers, run OUTSIDE the DeepSpeed engine (DESIGN §2 trap).

Under ZeRO-3 every rank must call the same partitioned modules the same number of times; a
partitioned vision tower would also be all-gathered on every step for a module that never trains.
So each rank keeps a plain, replicated, frozen copy of the towers and computes, per micro-batch,
the prefix features (fed to the trainable ``mapping`` inside the engine as ``vision_features``) and
the pooled CLS embedding (the stage-1 retrieval target). No gradient ever flows here.

zero3 mode: this copy is the ONLY one. The engine's model is built with ``vision_towers=False`` (its
front-end holds the trainable ``mapping`` alone), :func:`check_towers_outside` proves it after
``deepspeed.initialize``, and rank 0 writes the towers into every checkpoint from here
(``mks2.checkpoint.save_towers``). Pipeline mode: the first stage's own front-end (towers and mapping)
is wrapped here; no other stage builds or reads a tower.
"""

from __future__ import annotations

import torch
from torch import nn

from mks2.data.images import is_placeholder
from mks2.model.vision import VisionEncoding, VisionFrontEnd


class FrozenVision:
    """Replicated frozen towers of a ``VisionFrontEnd`` on ``device`` (eval mode, no grad)."""

    def __init__(self, front_end: VisionFrontEnd, device: torch.device, dtype: torch.dtype = torch.float32):
        # The towers are frozen by VisionFrontEnd itself; ``mapping`` may be the model's own trainable
        # one (pipeline mode shares the module with the first stage), so requires_grad is left alone.
        self.front_end = front_end
        self.front_end.to(device=device, dtype=dtype)  # the same cast DeepSpeed applies to the engine's copy
        self.front_end.eval()
        self.device = device

    @classmethod
    def build(cls, model_cfg, device: torch.device, dtype: torch.dtype = torch.float32) -> FrozenVision:
        """Load the towers from ``model.vision.path`` without touching the global RNG (the random
        init of the unused ``mapping`` must not shift the model's initialisation)."""
        with torch.random.fork_rng(devices=[]):
            front_end = VisionFrontEnd(model_cfg, load_weights=True)
        front_end.mapping = nn.Identity()  # the trainable mapping lives in the engine's model
        return cls(front_end, device, dtype)

    @property
    def num_prefix_tokens(self) -> int:
        return self.front_end.num_prefix_tokens

    @property
    def tower_numel(self) -> int:
        """Parameters of the frozen towers (the mapping excluded)."""
        return sum(p.numel() for n, p in self.front_end.named_parameters() if not n.startswith("mapping."))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisionEncoding:
        """pixel_values [N, 3, H, W] -> features [N, P, F] and pooled [N, E] (no gradient).

        Placeholders of undecodable images (``mks2.data.images``; their samples carry no loss) get zero
        features and a zero pooled embedding: the stage-1 retrieval loss leaves zero rows out."""
        bad = is_placeholder(pixel_values)  # [N]
        enc = self.front_end.encode(pixel_values.to(self.device, non_blocking=True))
        if not bad.any():
            return enc
        keep = (~bad).to(self.device)
        return VisionEncoding(
            features=enc.features * keep[:, None, None].to(enc.features.dtype),
            pooled=enc.pooled * keep[:, None].to(enc.pooled.dtype),
        )


def tower_parameter_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters that belong to vision towers: under a ``vision.`` front-end but not
    its trainable ``mapping`` (whatever wrapper prefixes the names: ``model.``, ``module.``)."""
    return [n for n, _ in module.named_parameters() if ".vision." in f".{n}" and ".vision.mapping." not in f".{n}"]


def check_towers_outside(module: nn.Module) -> None:
    """Raise if the ZeRO-3 engine's ``module`` holds a tower parameter (it would be partitioned, gathered at
    every save and listed in ZeRO's groups, while the replicated ``FrozenVision`` is what runs)."""
    inside = tower_parameter_names(module)
    if inside:
        raise RuntimeError(
            f"{len(inside)} frozen vision tower parameter(s) are inside the ZeRO-3 engine (first: {inside[0]}); "
            "build the model with vision_towers=False"
        )
