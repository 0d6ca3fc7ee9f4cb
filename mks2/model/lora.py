"""LoRA utilities. The adapters themselves live on :class:`mks2.model.layers.Linear` (``lora_A``/``lora_B``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mks2.model.layers import Linear

WeightGather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    """(name, layer) for every Linear that carries a LoRA adapter."""
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.lora_A is not None:
            yield name, module


@torch.no_grad()
def merge_lora(model: nn.Module, *, weight_gather: WeightGather | None = None) -> list[str]:
    """Fold every adapter into its base weight (``W += (alpha / r) * B @ A``, computed in fp32) and
    remove the adapter. Outputs are unchanged (up to rounding in the weight dtype); the merged model
    has plain HF-shaped weights, ready for export. Returns the names of the merged layers.

    ``weight_gather`` as in the loader (ZeRO-3: gathers W, A and B around the update).
    """
    merged = []
    for name, layer in list(lora_layers(model)):
        params = [layer.weight, layer.lora_A, layer.lora_B]
        with weight_gather(params) if weight_gather is not None else contextlib.nullcontext():
            delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.lora_scaling  # [out, in]
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
        layer.remove_lora()
        merged.append(name)
    return merged
