"""``build_model``: the one place that turns a run config into an initialised, correctly frozen model.

Order: architecture from ``model.init_from``'s config.json -> construct (random init skipped for the
weights the checkpoint provides) -> stream the HF weights -> initialise MVM experts from the MLP
(placement ``replace``) -> apply the stage's trainable/frozen split (DESIGN §1).

Stage-local builds (pipeline mode, ``keep=``): only the modules a pipeline stage holds are materialised.
Every top-level piece of the layout (``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``, ``lm_head``,
``vision``, ``retrieval``; see ``mks2.model.pipeline_layout``) is constructed in the usual order, so the
global RNG advances exactly as in a full build and the kept modules get the very values a full build gives
them, and a piece not kept moves to the meta device the moment it is attached to its parent: a foreign
decoder layer costs its random-init tensors (LoRA, routers; HF-provided weights are allocated but never
touched) for one layer's lifetime. The loaders skip meta parameters, so a rank reads only its own tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator

import torch
from torch import nn

from mks2.config.schema import MVMPlacement, RunConfig, Stage
from mks2.model.decoder import DecoderLayer
from mks2.model.hf_loading import apply_config_from_hf, load_hf_llama
from mks2.model.modeling import MKS2ForCausalLM, MKS2Model
from mks2.model.rope import RotaryEmbedding

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


def _piece_path(parent: nn.Module, name: str, child: nn.Module) -> str | None:
    """The layout module path (``model.layers.3``, ``lm_head``...) of ``child`` being attached to ``parent``
    as ``name``; None for anything below or beside those pieces."""
    if isinstance(child, DecoderLayer) and not isinstance(parent, DecoderLayer):
        return f"model.layers.{child.layer_idx}"
    if isinstance(parent, MKS2Model) and name in ("embed_tokens", "norm"):
        return f"model.{name}"
    if isinstance(parent, MKS2ForCausalLM) and name in ("lm_head", "vision", "retrieval"):
        return name
    return None


def _to_meta(piece: nn.Module) -> None:
    """Replace ``piece``'s parameters and buffers by meta tensors (same shapes, dtypes, ``requires_grad``),
    freeing their memory. The rotary embedding is skipped: one module shared by every layer of the model."""
    for module in piece.modules():
        if isinstance(module, RotaryEmbedding):
            continue
        for key, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[key] = nn.Parameter(
                    torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
                )
        for key, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[key] = torch.empty_like(buf, device="meta")


@contextlib.contextmanager
def _only(keep: Collection[str]) -> Iterator[None]:
    """While a model is constructed, move each layout piece whose path is not in ``keep`` to the meta device
    as soon as it is attached (see module docstring)."""

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if child is None:
            return
        path = _piece_path(parent, name, child)
        if path is not None and path not in keep:
            _to_meta(child)

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_model(
    cfg: RunConfig,
    *,
    load_weights: bool = True,
    weight_gather: WeightGather | None = None,
    keep: Collection[str] | None = None,
    read_weights: bool = True,
    vision_towers: bool = True,
) -> MKS2ForCausalLM:
    """Build the ``MKS2ForCausalLM`` of ``cfg.model.stage``.

    With ``model.init_from`` set, the architecture always comes from its config.json (``cfg.model`` is
    updated in place) and, if ``load_weights``, the weights are streamed in; the vision towers are
    loaded from ``model.vision.path`` likewise. ``load_weights=False`` gives a randomly initialised
    model of the right shape (e.g. to load a full checkpoint afterwards). ``weight_gather`` is the
    ZeRO-3 hook (``params -> context manager``) opened around every weight copy.

    ``keep``: build only these layout pieces (a pipeline stage's module paths); the others are on the meta
    device, never read. ``read_weights=False``: walk the HF loading (and its ``weight_gather`` contexts)
    without reading tensor data (ZeRO-3 ranks other than 0). ``vision_towers=False``: the vision front-end
    holds its trainable mapping only; the frozen towers are neither built nor read (ZeRO-3: they run in a
    replicated copy outside the engine). The random init is the same either way.
    """
    m = cfg.model
    if m.init_from:
        apply_config_from_hf(cfg, m.init_from)
    from_hf = bool(load_weights and m.init_from)
    read_vision = keep is None or "vision" in keep
    with _only(keep) if keep is not None else contextlib.nullcontext():
        model = MKS2ForCausalLM(
            m,
            init=not from_hf,
            load_vision_weights=load_weights,
            weight_gather=weight_gather,
            read_vision_weights=read_vision,
            vision_towers=vision_towers,
        )
    if from_hf:
        load_hf_llama(model, m.init_from, weight_gather=weight_gather, read=read_weights)
    if Stage(m.stage) != Stage.BASE:
        init_mvm_from_mlp(model, weight_gather=weight_gather)
    apply_trainable_split(model, m.stage)
    return model
