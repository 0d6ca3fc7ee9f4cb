"""Tiny random HF checkpoints saved locally for tests (no downloads).

Each builder seeds torch, builds a real ``transformers`` model on a tiny config, jitters every floating
tensor (HF inits many tensors to constants -- zero query tokens, unit LayerNorms, 1e-10 position
embeddings -- which would hide a loader that reads the wrong key), saves it with ``save_pretrained``
into ``directory`` and returns the HF model (eval mode) so tests can compare against it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
)

from tests.tiny import VOCAB

# Shapes shared by the vision fixtures: 32x32 images, 8x8 patches -> 16 patch tokens (+ CLS).
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
TINY_VISION_HIDDEN = 32
TINY_QFORMER_HIDDEN = 24  # differs from the vision width so shape mix-ups fail loudly
TINY_NUM_QUERY_TOKENS = 4


def _vision_fields(num_hidden_layers: int) -> dict:
    """A tiny ViT: 32x32 images in 8x8 patches, width 32."""
    return dict(
        hidden_size=TINY_VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )


def _text_fields(**fields) -> dict:
    """A one-layer text model of width 16 on a 64-token vocabulary (special ids as Llama's), plus ``fields``."""
    return dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, **fields)  # fmt: skip


def _jitter_(model: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * std)


def make_tiny_blip2(directory: str | Path, *, layout: str = "conditional", seed: int = 0):
    """Save a tiny random BLIP-2 (OPT language model) to ``directory``.

    layout: ``conditional`` (Blip2ForConditionalGeneration) or ``model`` (Blip2Model). Also saves a
    ``BlipImageProcessor`` config next to it. Returns the HF model in eval mode.
    """
    torch.manual_seed(seed)
    vision = _vision_fields(num_hidden_layers=2)
    qformer = dict(
        hidden_size=TINY_QFORMER_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        cross_attention_frequency=1,
        vocab_size=64,
        max_position_embeddings=32,
    )
    text = OPTConfig(**_text_fields(ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=64))
    cfg = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=TINY_NUM_QUERY_TOKENS
    )
    if layout == "conditional":
        model = Blip2ForConditionalGeneration(cfg)
    elif layout == "model":
        model = Blip2Model(cfg)
    else:
        raise ValueError(f"layout must be 'conditional' or 'model', got {layout!r}")
    _jitter_(model)
    model.eval()
    model.save_pretrained(directory)
    BlipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(directory)
    return model


def make_tiny_clip(directory: str | Path, *, full: bool = False, seed: int = 0):
    """Save a tiny random CLIP vision tower to ``directory``.

    full=False saves a ``CLIPVisionModel`` (model_type ``clip_vision_model``); full=True a dual-tower
    ``CLIPModel`` (model_type ``clip``, vision weights under ``vision_model.``). Also saves a
    ``CLIPImageProcessor`` config. Returns the HF model in eval mode.
    """
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**_vision_fields(num_hidden_layers=3), projection_dim=16)
    if full:
        text = _text_fields(intermediate_size=32, max_position_embeddings=16)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16))
    else:
        model = CLIPVisionModel(vision)
    _jitter_(model)
    model.eval()
    model.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(directory)
    return model


def make_tiny_llama(directory: str | Path, *, seed: int = 0, **overrides):
    """Save a tiny random ``LlamaForCausalLM`` (GQA: 4 query heads, 2 key/value heads) to ``directory``.

    ``overrides`` are LlamaConfig fields (e.g. ``rope_scaling=...``, ``num_hidden_layers=3``).
    Returns the HF model in eval mode.
    """
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    _jitter_(model, std=0.02)
    model.eval()
    model.save_pretrained(directory)
    return model


def make_tiny_llama_and_clip(tmp_path_factory, **llama_overrides) -> tuple[Path, Path]:
    """Save a tiny Llama (``llama_overrides`` as for make_tiny_llama) and a tiny CLIP vision tower into two
    new temporary directories; returns (llama_dir, clip_dir), for ``build(llama, ..., vision_dir=clip)``."""
    llama, clip = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("clip")
    make_tiny_llama(llama, **llama_overrides)
    make_tiny_clip(clip)
    return llama, clip
