"""generate() on an exported model with its key/value cache: the same greedy tokens and per-step logits
as without the cache and as a plain loop over our training model, for every stage's export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from mks2.export import export_model
from tests.export.export_helpers import random_ids, run_config, tiny_model
from tests.fixtures import make_tiny_clip

NEW_TOKENS = 6
ATOL = 1e-4  # fp32, per generated step

EXPORTS = {
    # name: (config overrides, export options, has vision); stage mvm always has a vision front-end
    "mvm": (("model.stage=mvm", "model.mvm.placement=parallel"), {}, True),
    "mome_lora": (
        ("model.stage=mome", "model.mome.router_init_std=0.5", "model.lora.targets=[mlp,mvm,q_proj]"),
        {},
        False,
    ),  # fmt: skip
    "mome_merged": (
        ("model.stage=mome", "model.mome.router_init_std=0.5", "model.lora.targets=[mlp,v_proj]"),
        {"merge_lora": True},
        False,
    ),  # fmt: skip
    "mome_vision": (("model.stage=mome", "model.mome.router_init_std=0.5"), {}, True),
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    make_tiny_clip(d)
    return d


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def exported(request, tmp_path_factory, clip_dir):
    """(our training model, the loaded export, has vision) per stage."""
    overrides, options, vision = EXPORTS[request.param]
    cfg = run_config(*overrides, vision_dir=clip_dir if vision else None)
    model = tiny_model(cfg)
    out = tmp_path_factory.mktemp(request.param) / "export"
    export_model(model, cfg, out, dtype="fp32", verify=False, progress=False, **options)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return model, hf, vision, out


def _prompts(model, *, padded: bool, image: bool):
    """input_ids [2, 12 (+P)], attention_mask, extra generate() kwargs (pixel_values)."""
    p = model.vision.num_prefix_tokens if image else 0
    ids = random_ids(2, 12 + p, seed=7)
    mask = torch.ones_like(ids)
    extra = {}
    if image:  # row 1 holds the image after 2 text tokens; the padding is left of it
        ids[1, 5 : 5 + p] = model.image_token_id
        extra["pixel_values"] = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if padded:
        ids[0, :3] = 0
        mask[0, :3] = 0
    return ids, mask, extra


@torch.no_grad()
def _reference_loop(model, ids, mask, extra):
    """Greedy decoding by recomputing the whole sequence with the training model: tokens, step logits."""
    seq, m, logits = ids, mask, []
    for _ in range(NEW_TOKENS):
        step = model(seq, attention_mask=m, **extra).logits[:, -1]  # [B, V]
        nxt = step.argmax(-1, keepdim=True)
        logits.append(step)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq, logits


def _generate(hf, ids, mask, extra, *, use_cache: bool):
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None,
                      return_dict_in_generate=True, output_logits=True, **extra)  # fmt: skip
    return out.sequences, list(out.logits)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_cached_generation_equals_uncached_and_training_model(exported, padded):
    model, hf, vision, _ = exported
    # With a vision front-end the prompt batch holds an image in row 1 and plain text in row 0, so a
    # separate text-only run would add nothing but time.
    _check_generation(model, hf, padded=padded, image=vision)


def _check_generation(model, hf, *, padded: bool, image: bool):
    ids, mask, extra = _prompts(model, padded=padded, image=image)
    ref_tokens, ref_logits = _reference_loop(model, ids, mask, extra)
    cached_tokens, cached_logits = _generate(hf, ids, mask, extra, use_cache=True)
    plain_tokens, plain_logits = _generate(hf, ids, mask, extra, use_cache=False)
    assert torch.equal(cached_tokens, ref_tokens)
    assert torch.equal(plain_tokens, ref_tokens)
    assert len(cached_logits) == len(plain_logits) == NEW_TOKENS
    for step, (cached, plain, ref) in enumerate(zip(cached_logits, plain_logits, ref_logits)):
        torch.testing.assert_close(cached, ref, atol=ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
        torch.testing.assert_close(plain, ref, atol=ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


@torch.no_grad()
def test_cache_holds_the_prompt_and_image_prefix_once(exported):
    """The prefill stores every prompt token (image prefix included) in every layer; a decode step
    feeds one token and no image, and still gives the uncached logits."""
    model, hf, vision, _ = exported
    ids, mask, extra = _prompts(model, padded=True, image=vision)
    cache = DynamicCache(config=hf.config)
    prefill = hf(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)
    assert cache.get_seq_length() == ids.shape[1]
    assert len(cache.layers) == hf.config.num_hidden_layers
    nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    step = hf(input_ids=nxt, attention_mask=mask2, past_key_values=cache, use_cache=True)  # no pixel_values
    assert step.logits.shape[1] == 1 and cache.get_seq_length() == ids.shape[1] + 1
    full = model(torch.cat([ids, nxt], 1), attention_mask=mask2, **extra).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, atol=ATOL, rtol=0)


def test_generation_config_enables_the_cache(exported):
    *_, out = exported
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is True


@torch.no_grad()
def test_fused_layers_equal_the_package_modules_and_follow_weight_updates(exported):
    """No-grad forwards run the fused layers (q/k/v, experts and router in fewer matmuls, LoRA folded):
    the same logits as the package modules' own forward, rebuilt after an in-place weight update, and
    not used where a forward hook on an expert must fire."""
    _, hf, _, _ = exported
    ids = random_ids(2, 9, seed=3)
    fused = hf(ids).logits
    assert all(
        "_fused_plan" in layer.__dict__ and "_fused_plan" in layer.self_attn.__dict__ for layer in hf.model.layers
    )
    hf.set_fused_inference(False)
    plain = hf(ids).logits
    assert not any("_fused_plan" in layer.__dict__ for layer in hf.model.layers)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    layer = hf.model.layers[0]
    weight, expert = (layer.mvm.up_proj.weight, layer.mvm) if layer.has_mvm else (layer.mlp.up_proj.weight, layer.mlp)
    old = weight.clone()
    try:
        hf.set_fused_inference(True)
        hf(ids)  # the fused weights are built from the current weights ...
        weight.mul_(1.5)  # ... then one changes in place
        got = hf(ids).logits
        hf.set_fused_inference(False)
        want = hf(ids).logits
    finally:
        weight.copy_(old)
        hf.set_fused_inference(True)
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    seen = []
    handle = expert.register_forward_hook(lambda *args: seen.append(1))
    try:
        torch.testing.assert_close(hf(ids).logits, fused, atol=1e-5, rtol=0)
    finally:
        handle.remove()
    assert seen, "a hooked expert must run as a module"
