"""Vision front-end: frozen BLIP-2 / CLIP towers from a local transformers checkpoint + trainable mapping.

``VisionFrontEnd(model_cfg)`` turns images into the prefix embeddings spliced at the ``<image>``
placeholder (DESIGN §1):

* ``blip2``: frozen BLIP-2 vision model -> frozen Q-Former with its learned query tokens ->
  features [N, num_query_tokens, qformer_hidden] -> trainable ``mapping`` -> prefix [N, P, D].
  Only ``vision_model.*``, ``qformer.*`` and ``query_tokens`` are read from the checkpoint; the
  OPT/T5 language model of a ``Blip2Model`` / ``Blip2ForConditionalGeneration`` directory is never
  built nor loaded.
* ``clip``: frozen CLIP vision tower -> patch tokens of ``model.vision.feature_layer`` (default -2,
  the PENULTIMATE layer, as LLaVA does: the last layer is tuned for the contrastive CLS objective,
  the one before keeps more spatial detail), CLS excluded -> features
  [N, (H/patch) * (W/patch), vision_hidden] -> trainable ``mapping``.

The towers are frozen: ``requires_grad=False``, kept in eval mode even when ``.train()`` is called
(no dropout noise in what is a fixed feature extractor) and run under ``torch.no_grad``. ``pooled``
returns the vision encoder's own pooled output (CLS after its post-LayerNorm, exactly transformers'
``pooler_output``; before the Q-Former for BLIP-2), the image side of stage-1 retrieval.

Weights stream tensor by tensor (safetensors or ``.bin``, sharded or not) into towers allocated
without random initialisation, so the tower is never held twice. ``weight_gather`` (an optional
``params -> context manager``, e.g. DeepSpeed's ``GatheredParameters`` under ZeRO-3) is opened around
each copy; this file imports no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from mks2.config.schema import VisionKind
from mks2.model.dtypes import torch_dtype
from mks2.model.hf_loading import HFCheckpointError, _iter_file, checkpoint_index

WeightGather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]

# model_type values accepted for each kind (from the checkpoint's config.json).
_MODEL_TYPES = {
    VisionKind.BLIP2: ("blip-2",),
    VisionKind.CLIP: ("clip", "clip_vision_model"),
}
_EXPECTED_LAYOUT = {
    VisionKind.BLIP2: "a transformers Blip2Model / Blip2ForConditionalGeneration checkpoint",
    VisionKind.CLIP: "a transformers CLIPModel / CLIPVisionModel checkpoint",
}
# Top-level submodules of transformers' CLIPVisionModel (the keys a CLIP vision checkpoint may hold).
_CLIP_VISION_PARTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")


class VisionEncoding(NamedTuple):
    """Outputs of one pass through the frozen towers."""

    features: torch.Tensor  # [N, P, feature_dim]: what ``mapping`` consumes (precomputable)
    pooled: torch.Tensor  # [N, embed_dim]: vision encoder's pooled CLS output (retrieval target)


@dataclass(frozen=True)
class VisionCheckpointInfo:
    """What ``config.json`` of a vision checkpoint says, resolved against ``model.vision``."""

    path: Path
    kind: VisionKind
    model_type: str
    hf_config: Any  # Blip2Config (blip2) or CLIPVisionConfig (clip)
    vision_config: Any  # Blip2VisionConfig or CLIPVisionConfig
    image_size: int  # input resolution used (model.vision.image_size or the checkpoint's)
    native_image_size: int  # resolution the position embeddings were trained at
    patch_size: int
    num_prefix_tokens: int  # P
    feature_layer: int  # CLIP: index into hidden_states of the prefix features (BLIP-2: unused)
    feature_dim: int  # width of the frozen features fed to ``mapping``
    embed_dim: int  # width of the pooled output (vision_dim)


# --------------------------------------------------------------------------------------------
# config.json only (cheap: used by data collators)
# --------------------------------------------------------------------------------------------


def _square_size(value: Any, what: str, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise HFCheckpointError(f"{path}/config.json: only square {what} is supported, got {list(value)}")
        value = value[0]
    return int(value)


def read_vision_checkpoint(model_cfg: Any) -> VisionCheckpointInfo:
    """Read and check ``model.vision.path``'s config.json (no weights). Raises ValueError naming the
    path and the expected ``model_type`` when the directory is missing or of the wrong kind."""
    vis = model_cfg.vision
    kind = VisionKind(vis.kind)
    if kind == VisionKind.NONE:
        raise HFCheckpointError("model.vision.kind is 'none': this model has no vision front-end")
    if not vis.path:
        raise HFCheckpointError(f"model.vision.path: required when model.vision.kind={kind.value}")
    if str(vis.path) == "demo":
        raise HFCheckpointError(
            "model.vision.path=demo has not been resolved: call mks2.demo.resolve(cfg) before building the model"
        )
    path = Path(vis.path).expanduser()
    expected = " or ".join(f"'{t}'" for t in _MODEL_TYPES[kind])
    if not path.is_dir():
        raise HFCheckpointError(
            f"model.vision.path: directory {path} does not exist "
            f"(expected {_EXPECTED_LAYOUT[kind]} with model_type {expected})"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"model.vision.path: {path} has no config.json (expected {_EXPECTED_LAYOUT[kind]})")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{config_file}: not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES[kind]:
        raise HFCheckpointError(
            f"{config_file}: model_type is {model_type!r} but model.vision.kind={kind.value} expects "
            f"model_type {expected} ({_EXPECTED_LAYOUT[kind]})"
        )

    if kind == VisionKind.BLIP2:
        from transformers import Blip2Config

        hf_config = Blip2Config.from_dict(raw)
        vision_config = hf_config.vision_config
    else:
        from transformers import CLIPVisionConfig

        vision_config = CLIPVisionConfig.from_dict(raw.get("vision_config") or {} if model_type == "clip" else raw)
        hf_config = vision_config

    native = _square_size(vision_config.image_size, "image_size", path)
    patch = _square_size(vision_config.patch_size, "patch_size", path)
    size = int(vis.image_size) if vis.image_size is not None else native
    if size < patch or size % patch:
        raise HFCheckpointError(
            f"model.vision.image_size ({size}) must be a positive multiple of the patch size ({patch}) of {path}"
        )
    feature_layer = int(getattr(vis, "feature_layer", -2))
    if kind == VisionKind.BLIP2:
        prefix, feature_dim = int(hf_config.num_query_tokens), int(hf_config.qformer_config.hidden_size)
    else:
        prefix, feature_dim = (size // patch) ** 2, int(vision_config.hidden_size)
        n_layers = int(vision_config.num_hidden_layers)
        if not -(n_layers + 1) <= feature_layer <= n_layers:
            raise HFCheckpointError(
                f"model.vision.feature_layer ({feature_layer}) is outside -{n_layers + 1}..{n_layers} for the "
                f"{n_layers}-layer CLIP tower in {path}"
            )
    return VisionCheckpointInfo(
        path=path,
        kind=kind,
        model_type=model_type,
        hf_config=hf_config,
        vision_config=vision_config,
        image_size=size,
        native_image_size=native,
        patch_size=patch,
        num_prefix_tokens=prefix,
        feature_layer=feature_layer,
        feature_dim=feature_dim,
        embed_dim=int(vision_config.hidden_size),
    )


def vision_prefix_length(model_cfg: Any) -> int:
    """P, the number of prefix embeddings per image (0 when ``model.vision.kind`` is none).
    Reads only the checkpoint's config.json."""
    if VisionKind(model_cfg.vision.kind) == VisionKind.NONE:
        return 0
    return read_vision_checkpoint(model_cfg).num_prefix_tokens


def vision_embed_dim(model_cfg: Any) -> int:
    """Width of the vision encoder's pooled output (the retrieval embedding size). Reads config.json."""
    return read_vision_checkpoint(model_cfg).embed_dim


# --------------------------------------------------------------------------------------------
# Image processor (for data loader workers)
# --------------------------------------------------------------------------------------------


def _resize_processor(processor: Any, size: int) -> Any:
    """Point a BLIP/CLIP-style image processor at a square ``size`` x ``size`` output."""
    current = dict(getattr(processor, "size", None) or {})
    if "shortest_edge" in current:
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "do_center_crop", False) or getattr(processor, "crop_size", None):
        processor.crop_size = {"height": size, "width": size}
    return processor


def load_image_processor(model_cfg: Any) -> Any:
    """The transformers image processor saved in the vision directory, or (when it has none) the
    standard one of the kind (BLIP: resize to a square; CLIP: resize shortest edge + centre crop;
    both with OpenAI-CLIP mean/std). Its output size always equals the model's input resolution."""
    return _image_processor(read_vision_checkpoint(model_cfg))


def _image_processor(info: VisionCheckpointInfo) -> Any:
    if (info.path / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(info.path))
    else:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        s = info.image_size
        if info.kind == VisionKind.BLIP2:
            from transformers import BlipImageProcessorPil

            processor = BlipImageProcessorPil(
                size={"height": s, "width": s}, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD
            )
        else:
            from transformers import CLIPImageProcessorPil

            processor = CLIPImageProcessorPil(
                size={"shortest_edge": s},
                crop_size={"height": s, "width": s},
                image_mean=OPENAI_CLIP_MEAN,
                image_std=OPENAI_CLIP_STD,
            )
    return _resize_processor(processor, info.image_size)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore the global RNG (CPU, and the current CUDA device once CUDA is in use) on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class QueryTokens(nn.Module):
    """BLIP-2's learned Q-Former queries ``weight`` [1, Q, H] (checkpoint key ``query_tokens``).

    A module of their own rather than a bare parameter of ``VisionFrontEnd``: a wrapper that gathers
    parameters in module hooks (ZeRO-3) then also gathers them when ``encode`` runs outside
    ``VisionFrontEnd.forward``.
    """

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_queries, hidden_size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1)  # [batch, Q, H]


class VisionFrontEnd(nn.Module):
    """Frozen vision towers + trainable ``mapping`` (feature_dim -> hidden size). See module docstring.

    Args:
        model_cfg: ``cfg.model`` (reads ``hidden_size`` and the ``vision`` section).
        load_weights: stream the towers' weights from ``model.vision.path``. False leaves them randomly
            initialised (shape-only builds, e.g. before loading a full checkpoint).
        weight_gather: optional ``params -> context manager`` opened around each tensor copy (ZeRO-3).
        read_weights: with ``load_weights``, False allocates the towers as for loading (no random init) but
            reads nothing: they are never used (another pipeline stage's).
        towers: False builds the trainable ``mapping`` alone (``encode``/``pooled`` then refuse): the frozen
            towers live and run elsewhere (ZeRO-3: a replicated copy outside the engine,
            ``mks2.training.frozen_vision``), so they are neither allocated nor read here.

    Building the towers never touches the global RNG (their constructors draw ``torch.randn`` for the
    class / position embeddings even when the weights come from the checkpoint): the random init of
    everything built after them (``mapping``, retrieval head, MVM, LoRA) is the same with or without them.
    """

    def __init__(
        self,
        model_cfg: Any,
        *,
        load_weights: bool = True,
        weight_gather: WeightGather | None = None,
        read_weights: bool = True,
        towers: bool = True,
    ):
        super().__init__()
        info = read_vision_checkpoint(model_cfg)
        self.has_towers = towers
        self.info = info
        self.kind = info.kind
        self.num_prefix_tokens = info.num_prefix_tokens
        self.embed_dim = info.embed_dim
        self.feature_dim = info.feature_dim
        self.hidden_size = int(model_cfg.hidden_size)
        # Positional embeddings are resampled when the configured resolution differs from the native one.
        self._interpolate = info.image_size != info.native_image_size

        dtype = torch_dtype(model_cfg.dtype)

        from transformers.initialization import no_init_weights

        # Towers are allocated without random init when their weights come from the checkpoint, and
        # directly in the model dtype (never a second, fp32 copy).
        def tower_ctx(tower_dtype: torch.dtype) -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            if load_weights:
                stack.enter_context(no_init_weights())
            stack.enter_context(_default_dtype(tower_dtype))
            return stack

        def build_towers() -> None:
            if info.kind == VisionKind.BLIP2:
                from transformers import Blip2QFormerModel, Blip2VisionModel

                cfg = info.hf_config
                with tower_ctx(dtype):
                    self.vision_model = Blip2VisionModel(cfg.vision_config)
                with tower_ctx(torch.float32):  # transformers keeps the Q-Former and queries in fp32 too
                    self.qformer = Blip2QFormerModel(cfg.qformer_config)
                    self.query_tokens = QueryTokens(cfg.num_query_tokens, cfg.qformer_config.hidden_size)
            else:
                from transformers import CLIPVisionModel

                with tower_ctx(dtype):
                    self.vision_model = CLIPVisionModel(info.vision_config)
            for p in self._frozen_parameters():
                p.requires_grad_(False)

        if towers:
            with _rng_untouched():
                build_towers()
        self.mapping = nn.Linear(self.feature_dim, self.hidden_size, dtype=dtype)  # trainable, default Linear init
        if towers and load_weights and read_weights:
            self._load_towers(weight_gather)
        self.train(self.training)  # puts the towers in eval mode

    # ---- structure -----------------------------------------------------------------------

    def _frozen_modules(self) -> list[nn.Module]:
        if not self.has_towers:
            return []
        if self.kind == VisionKind.BLIP2:
            return [self.vision_model, self.qformer, self.query_tokens]
        return [self.vision_model]

    def _frozen_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._frozen_modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> VisionFrontEnd:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()  # frozen feature extractor: never dropout, whatever the parent's mode
        return self

    def extra_repr(self) -> str:
        i = self.info
        out = f"kind={i.kind.value}, path={i.path}, image_size={i.image_size}, prefix_tokens={i.num_prefix_tokens}"
        return out if self.has_towers else out + ", towers outside"

    # ---- loading ---------------------------------------------------------------------------

    def _checkpoint_name(self, key: str) -> str | None:
        """Our state-dict name for a checkpoint key, or None when the key is not part of the towers."""
        if self.kind == VisionKind.BLIP2:
            if key == "query_tokens":
                return "query_tokens.weight"
            if key.startswith(("vision_model.", "qformer.")):
                return key
            return None
        # CLIP: CLIPModel and transformers-4 CLIPVisionModel files prefix the tower with
        # ``vision_model.``; transformers-5 CLIPVisionModel files do not. Text tower and projections
        # (``text_model.*``, ``visual_projection``, ``logit_scale``) are not ours.
        rest = key.removeprefix("vision_model.")
        if rest.split(".", 1)[0] in _CLIP_VISION_PARTS:
            return "vision_model." + rest
        return None

    def _load_towers(self, weight_gather: WeightGather | None) -> None:
        """Stream the towers' tensors in; every missing, unexpected or duplicated tensor is reported
        (naming it) before anything is copied, a mis-shaped one when it is reached."""
        path = self.info.path
        targets = {n: t for n, t in self.state_dict(keep_vars=True).items() if not n.startswith("mapping.")}
        # Non-persistent buffers (e.g. position_ids) are rebuilt by the constructors; older files may carry them.
        skip = {
            f"{prefix}.{b}" if prefix else b
            for prefix, module in self.named_modules()
            for b in getattr(module, "_non_persistent_buffers_set", ())
        }
        wanted: dict[str, str] = {}  # checkpoint key -> our name
        unexpected: list[str] = []
        duplicated: list[str] = []
        index = checkpoint_index(path)
        for key in index:
            name = self._checkpoint_name(key)
            if name is None or name in skip:
                continue
            if name not in targets:
                unexpected.append(key)
            elif name in wanted.values():
                duplicated.append(key)
            else:
                wanted[key] = name
        # Missing tensors are named as in transformers' Blip2Model / CLIPModel.
        missing = sorted(n.removesuffix(".weight") if n.startswith("query_tokens.") else n
                         for n in set(targets) - set(wanted.values()))  # fmt: skip
        problems = []
        for what, keys in (("lacks", missing), ("has unexpected", unexpected), ("has duplicated", duplicated)):
            if keys:
                shown = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
                problems.append(f"{what} {len(keys)} tensor(s) of the {self.kind.value} vision tower: {shown}")
        if problems:
            raise HFCheckpointError(f"{path}: checkpoint " + "; ".join(problems))

        by_file: dict[Path, list[str]] = {}
        for key in wanted:
            by_file.setdefault(index[key], []).append(key)
        bar = tqdm(total=len(wanted), desc=f"loading vision tower {path.name}", unit="tensor", leave=False)
        for file, keys in by_file.items():
            for key, tensor in _iter_file(file, keys):
                dst = targets[wanted[key]]
                is_param = isinstance(dst, nn.Parameter)
                gather = weight_gather([dst]) if weight_gather is not None and is_param else contextlib.nullcontext()
                with gather, torch.no_grad():
                    if tuple(dst.shape) != tuple(tensor.shape):
                        raise HFCheckpointError(
                            f"{path}: tensor {key!r} (in {file.name}) has shape {tuple(tensor.shape)} but the "
                            f"{self.kind.value} vision tower built from its config.json expects {tuple(dst.shape)}"
                        )
                    dst.copy_(tensor)
                bar.update()
        bar.close()

    # ---- compute ---------------------------------------------------------------------------

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.has_towers:
            raise ValueError(
                f"this vision front-end of {self.info.path} holds the trainable mapping only (towers=False): its "
                "frozen towers run outside it (mks2.training.frozen_vision.FrozenVision); pass vision_features"
            )
        s = self.info.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise HFCheckpointError(
                f"pixel_values: expected shape [N, 3, {s}, {s}] for {self.info.path}, got {tuple(pixel_values.shape)}"
            )
        return pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> VisionEncoding:
        """One pass through the frozen towers: prefix features and pooled output (no gradient)."""
        px = self._check_pixels(pixel_values)  # [N, 3, H, W]
        if self.kind == VisionKind.BLIP2:
            out = self.vision_model(pixel_values=px, interpolate_pos_encoding=self._interpolate)
            image_embeds = out.last_hidden_state  # [N, 1 + patches, vision_dim]
            queries = self.query_tokens(image_embeds.shape[0])  # [N, Q, qformer_hidden]
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            q = self.qformer(
                query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask
            )
            return VisionEncoding(features=q.last_hidden_state, pooled=out.pooler_output)
        out = self.vision_model(pixel_values=px, interpolate_pos_encoding=self._interpolate, output_hidden_states=True)
        # hidden_states = (encoder input, layer 1, ..., layer L); default -2 = layer L-1. Drop CLS (index 0).
        features = out.hidden_states[self.info.feature_layer][:, 1:]  # [N, patches, vision_dim]
        return VisionEncoding(features=features, pooled=out.pooler_output)

    @torch.no_grad()
    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision encoder's pooled CLS output (post-LayerNorm, before any Q-Former): [N, embed_dim]."""
        px = self._check_pixels(pixel_values)
        return self.vision_model(pixel_values=px, interpolate_pos_encoding=self._interpolate).pooler_output

    def forward(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prefix embeddings [N, P, hidden_size] from images [N, 3, H, W] or from precomputed
        ``vision_features`` [N, P, feature_dim] (= ``encode(pixel_values).features``)."""
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("VisionFrontEnd: pass exactly one of pixel_values or vision_features")
        if vision_features is None:
            vision_features = self.encode(pixel_values).features
        expected = (self.num_prefix_tokens, self.feature_dim)
        if vision_features.dim() != 3 or tuple(vision_features.shape[1:]) != expected:
            raise ValueError(
                f"vision_features: expected shape [N, {expected[0]}, {expected[1]}] for {self.info.path}, "
                f"got {tuple(vision_features.shape)}"
            )
        return self.mapping(vision_features.to(self.mapping.weight.dtype))  # [N, P, D]

    def image_processor(self) -> Any:
        """Image processor matching this tower's input (see ``load_image_processor``)."""
        return _image_processor(self.info)
