"""``build_model``: the one place that turns a run config into an initialised, correctly frozen model.

Order: architecture from ``model.init_from``'s config.json -> construct (random init skipped for the
weights the checkpoint provides) -> stream the HF weights -> initialise MVM experts from the MLP
(placement ``replace``) -> apply the stage's trainable/frozen split (DESIGN §1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from mks2.config.schema import MVMPlacement, RunConfig, Stage
from mks2.model.hf_loading import apply_config_from_hf, load_hf_llama
from mks2.model.modeling import MKS2ForCausalLM

WeightGather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def is_trainable(name: str, stage: Stage | str) -> bool:
    """DESIGN §1's trainable/frozen split, by parameter name.

    - vision towers (``vision.*`` except ``vision.mapping``) are always frozen;
    - ``base``: every other parameter (the whole LLM, plus the vision mapping when present);
    - ``mvm``: MVM experts, vision mapping, retrieval projection and logit scale;
    - ``mome``: LoRA adapters, routers, vision mapping.
    """
    stage = Stage(getattr(stage, "value", stage))
    if name.startswith("vision.") and not name.startswith("vision.mapping."):
        return False
    if stage == Stage.BASE:
        return True
    if name.startswith("vision.mapping."):
        return True
    if stage == Stage.MVM:
        return ".mvm." in name or name.startswith("retrieval.")
    return "lora_A" in name or "lora_B" in name or ".router." in name


def apply_trainable_split(model: nn.Module, stage: Stage | str) -> None:
    """Set ``requires_grad`` on every parameter according to :func:`is_trainable`."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, stage))


def init_mvm_from_mlp(model: MKS2ForCausalLM, *, weight_gather: WeightGather | None = None) -> int:
    """Placement ``replace``: copy each layer's MLP into its MVM (exact copy, so a fresh stage-1 model
    computes the base model's function). Returns the number of layers initialised."""
    if MVMPlacement(model.config.mvm.placement) != MVMPlacement.REPLACE:
        return 0
    count = 0
    for layer in model.model.layers:
        if not getattr(layer, "has_mvm", False):
            continue
        for src, dst in zip(layer.mlp.projections(), layer.mvm.projections()):
            params = [src.weight, dst.weight]
            with weight_gather(params) if weight_gather is not None else contextlib.nullcontext():
                if src.weight.shape != dst.weight.shape:
                    raise ValueError(
                        f"layer {layer.layer_idx}: MVM {tuple(dst.weight.shape)} cannot start as a copy of the MLP "
                        f"{tuple(src.weight.shape)} (placement=replace needs equal widths)"
                    )
                dst.weight.data.copy_(src.weight.data)
        count += 1
    return count


def build_model(
    cfg: RunConfig, *, load_weights: bool = True, weight_gather: WeightGather | None = None
) -> MKS2ForCausalLM:
    """Build the ``MKS2ForCausalLM`` of ``cfg.model.stage``.

    With ``model.init_from`` set, the architecture always comes from its config.json (``cfg.model`` is
    updated in place) and, if ``load_weights``, the weights are streamed in; the vision towers are
    loaded from ``model.vision.path`` likewise. ``load_weights=False`` gives a randomly initialised
    model of the right shape (e.g. to load a full checkpoint afterwards). ``weight_gather`` is the
    ZeRO-3 hook (``params -> context manager``) opened around every weight copy.
    """
    m = cfg.model
    if m.init_from:
        apply_config_from_hf(cfg, m.init_from)
    from_hf = bool(load_weights and m.init_from)
    model = MKS2ForCausalLM(m, init=not from_hf, load_vision_weights=load_weights, weight_gather=weight_gather)
    if from_hf:
        load_hf_llama(model, m.init_from, weight_gather=weight_gather)
    if Stage(m.stage) != Stage.BASE:
        init_mvm_from_mlp(model, weight_gather=weight_gather)
    apply_trainable_split(model, m.stage)
    return model
