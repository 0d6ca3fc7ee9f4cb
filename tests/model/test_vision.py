"""Vision front-end and retrieval head against real transformers BLIP-2 / CLIP models (tiny, random)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mks2.config import load_config
from mks2.model.retrieval import RetrievalHead
from mks2.model.vision import (
    VisionFrontEnd,
    load_image_processor,
    read_vision_checkpoint,
    vision_embed_dim,
    vision_prefix_length,
)
from tests.fixtures import (
    TINY_IMAGE_SIZE,
    TINY_NUM_QUERY_TOKENS,
    TINY_PATCH_SIZE,
    TINY_QFORMER_HIDDEN,
    TINY_VISION_HIDDEN,
    make_tiny_blip2,
    make_tiny_clip,
    make_tiny_llama,
)

HIDDEN = 64  # demo.yaml's LLM width
NUM_PATCHES = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2


def model_cfg(kind: str, path, *extra: str):
    return load_config(None, [f"model.vision.kind={kind}", f"model.vision.path={path}", *extra]).model


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("blip2")
    hf = make_tiny_blip2(d)
    return d, hf


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    hf = make_tiny_clip(d)
    return d, hf


def pixels(n: int = 3, size: int = TINY_IMAGE_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# BLIP-2
# --------------------------------------------------------------------------------------------


def test_blip2_prefix_matches_hf_qformer_and_pooled(blip2_dir):
    d, hf = blip2_dir
    vis = VisionFrontEnd(model_cfg("blip2", d))
    assert vis.num_prefix_tokens == TINY_NUM_QUERY_TOKENS == vision_prefix_length(model_cfg("blip2", d))
    assert vis.embed_dim == TINY_VISION_HIDDEN == vision_embed_dim(model_cfg("blip2", d))
    px = pixels()
    prefix = vis(pixel_values=px)
    assert prefix.shape == (3, TINY_NUM_QUERY_TOKENS, HIDDEN)

    with torch.no_grad():
        hf_vision = hf.vision_model(pixel_values=px)
        hf_q = hf.qformer(
            query_embeds=hf.query_tokens.expand(3, -1, -1),
            encoder_hidden_states=hf_vision.last_hidden_state,
            encoder_attention_mask=torch.ones(hf_vision.last_hidden_state.shape[:-1], dtype=torch.long),
        ).last_hidden_state  # [3, Q, qformer_hidden]
    enc = vis.encode(px)
    assert enc.features.shape == (3, TINY_NUM_QUERY_TOKENS, TINY_QFORMER_HIDDEN)
    torch.testing.assert_close(enc.features, hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix, vis.mapping(hf_q), atol=1e-5, rtol=1e-5)
    # Pooled = the vision encoder's own pooler_output (CLS after post-LayerNorm), before the Q-Former.
    torch.testing.assert_close(vis.pooled(px), hf_vision.pooler_output, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(enc.pooled, hf_vision.pooler_output, atol=1e-6, rtol=1e-6)
    assert vis.pooled(px).shape == (3, TINY_VISION_HIDDEN)


def test_blip2_loads_only_vision_weights_exactly(blip2_dir):
    d, hf = blip2_dir
    vis = VisionFrontEnd(model_cfg("blip2", d))
    ours = vis.state_dict()
    hf_state = hf.state_dict()
    tower_keys = [k for k in ours if not k.startswith("mapping.")]
    assert tower_keys and all(k.startswith(("vision_model.", "qformer.", "query_tokens")) for k in tower_keys)
    for k in tower_keys:
        hf_key = "query_tokens" if k == "query_tokens.weight" else k  # our queries are a small module
        torch.testing.assert_close(ours[k], hf_state[hf_key], atol=0, rtol=0, msg=k)
    assert len(tower_keys) == len([k for k in hf_state if k.startswith(("vision_model.", "qformer.", "query_"))])
    # No language model or language projection was built.
    assert not any("language" in name for name, _ in vis.named_modules())


def test_blip2model_layout_and_sharded_checkpoint(tmp_path):
    # Blip2Model layout (language_model is an OPTModel), saved sharded: still only the vision parts load.
    hf = make_tiny_blip2(tmp_path / "m", layout="model", seed=1)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shutil.copy(tmp_path / "m" / "preprocessor_config.json", tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    vis = VisionFrontEnd(model_cfg("blip2", tmp_path / "sharded"))
    px = pixels(2, seed=3)
    with torch.no_grad():
        want = hf.get_qformer_features(pixel_values=px)
    torch.testing.assert_close(vis.encode(px).features, want, atol=1e-5, rtol=1e-5)


def test_bin_checkpoint_loads(tmp_path, blip2_dir):
    d, hf = blip2_dir
    (tmp_path / "bin").mkdir()
    shutil.copy(d / "config.json", tmp_path / "bin")
    torch.save(load_file(str(d / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    vis = VisionFrontEnd(model_cfg("blip2", tmp_path / "bin"))
    px = pixels(2)
    with torch.no_grad():
        want = hf.vision_model(pixel_values=px).pooler_output
    torch.testing.assert_close(vis.pooled(px), want, atol=1e-6, rtol=1e-6)


def test_frozen_split_and_eval_mode_survive_train(blip2_dir, clip_dir):
    for kind, (d, _) in (("blip2", blip2_dir), ("clip", clip_dir)):
        vis = VisionFrontEnd(model_cfg(kind, d))
        trainable = {n for n, p in vis.named_parameters() if p.requires_grad}
        assert trainable == {"mapping.weight", "mapping.bias"}, kind
        vis.train()
        assert vis.training and vis.mapping.training
        assert not vis.vision_model.training
        assert all(not m.training for m in vis.vision_model.modules())
        if kind == "blip2":
            assert not vis.qformer.training and not vis.query_tokens.weight.requires_grad

        # Gradient reaches the mapping only; the towers are run under no_grad.
        prefix = vis(pixel_values=pixels(2))
        prefix.square().sum().backward()
        assert vis.mapping.weight.grad is not None and vis.mapping.weight.grad.abs().sum() > 0
        assert all(p.grad is None for n, p in vis.named_parameters() if not n.startswith("mapping."))


def test_bf16_model_dtype(blip2_dir):
    # Towers and mapping in the model dtype; the Q-Former and query tokens stay fp32 as in transformers.
    d, _ = blip2_dir
    vis = VisionFrontEnd(model_cfg("blip2", d, "model.dtype=bf16"))
    assert {p.dtype for p in vis.vision_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vis.qformer.parameters()} == {torch.float32}
    assert vis.query_tokens.weight.dtype == torch.float32 and vis.mapping.weight.dtype == torch.bfloat16
    px = pixels(2)
    prefix = vis(pixel_values=px)
    assert prefix.dtype == torch.bfloat16 and prefix.shape == (2, TINY_NUM_QUERY_TOKENS, HIDDEN)
    want = VisionFrontEnd(model_cfg("blip2", d)).encode(px).features  # fp32 reference (checked against HF above)
    torch.testing.assert_close(vis.encode(px).features, want, atol=0.05, rtol=0.05)
    assert torch.get_default_dtype() == torch.float32  # construction did not leak its dtype


def test_dropout_in_qformer_is_off_in_train_mode(blip2_dir):
    # The Q-Former config has dropout 0.1: outputs would differ between calls if it were in train mode.
    d, _ = blip2_dir
    vis = VisionFrontEnd(model_cfg("blip2", d)).train()
    px = pixels(2)
    torch.testing.assert_close(vis(pixel_values=px), vis(pixel_values=px), atol=0, rtol=0)


def test_vision_features_path_equals_pixel_path(blip2_dir, clip_dir):
    for kind, (d, _) in (("blip2", blip2_dir), ("clip", clip_dir)):
        vis = VisionFrontEnd(model_cfg(kind, d))
        px = pixels(2, seed=5)
        feats = vis.encode(px).features
        from_feats = vis(vision_features=feats)
        torch.testing.assert_close(from_feats, vis(pixel_values=px), atol=0, rtol=0)
        from_feats.sum().backward()  # the mapping still trains from precomputed features
        assert vis.mapping.weight.grad is not None
        with pytest.raises(ValueError, match="exactly one"):
            vis(pixel_values=px, vision_features=feats)
        with pytest.raises(ValueError, match="exactly one"):
            vis()
        with pytest.raises(ValueError, match=r"vision_features: expected shape \[N, "):
            vis(vision_features=feats[:, :-1])
        with pytest.raises(ValueError, match=r"pixel_values: expected shape \[N, 3, 32, 32\]"):
            vis(pixel_values=pixels(2, size=16))


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def test_clip_prefix_is_penultimate_patch_tokens(clip_dir):
    d, hf = clip_dir
    cfg = model_cfg("clip", d)
    vis = VisionFrontEnd(cfg)
    assert vis.num_prefix_tokens == NUM_PATCHES == vision_prefix_length(cfg)
    assert vis.embed_dim == TINY_VISION_HIDDEN == vision_embed_dim(cfg)
    px = pixels()
    prefix = vis(pixel_values=px)
    assert prefix.shape == (3, NUM_PATCHES, HIDDEN)
    with torch.no_grad():
        out = hf(pixel_values=px, output_hidden_states=True)
    want = out.hidden_states[hf.config.num_hidden_layers - 1][:, 1:]  # output of layer L-1, no CLS
    torch.testing.assert_close(vis.encode(px).features, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix, vis.mapping(want), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vis.pooled(px), out.pooler_output, atol=1e-6, rtol=1e-6)


def test_clip_feature_layer_selects_hidden_state(clip_dir):
    d, hf = clip_dir
    px = pixels(2)
    with torch.no_grad():
        hidden = hf(pixel_values=px, output_hidden_states=True).hidden_states  # L + 1 entries
    for layer in (-1, 1):
        vis = VisionFrontEnd(model_cfg("clip", d, f"model.vision.feature_layer={layer}"))
        torch.testing.assert_close(vis.encode(px).features, hidden[layer][:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"model.vision.feature_layer \(4\) is outside -4..3"):
        read_vision_checkpoint(model_cfg("clip", d, "model.vision.feature_layer=4"))


def test_clip_dual_tower_checkpoint(tmp_path):
    # CLIPModel (model_type 'clip'): vision tower under 'vision_model.', text tower ignored.
    hf = make_tiny_clip(tmp_path, full=True, seed=2)
    vis = VisionFrontEnd(model_cfg("clip", tmp_path))
    px = pixels(2)
    with torch.no_grad():
        want = hf.vision_model(pixel_values=px).pooler_output
    torch.testing.assert_close(vis.pooled(px), want, atol=1e-6, rtol=1e-6)
    assert not any(n.startswith(("text_model", "visual_projection")) for n, _ in vis.named_parameters())


def test_clip_other_resolution_interpolates_positions(clip_dir):
    d, hf = clip_dir
    cfg = model_cfg("clip", d, "model.vision.image_size=48")
    assert vision_prefix_length(cfg) == (48 // TINY_PATCH_SIZE) ** 2
    vis = VisionFrontEnd(cfg)
    px = pixels(2, size=48)
    assert vis(pixel_values=px).shape == (2, 36, HIDDEN)
    with torch.no_grad():
        want = hf(pixel_values=px, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(vis.pooled(px), want, atol=1e-5, rtol=1e-5)
    assert load_image_processor(cfg).crop_size == {"height": 48, "width": 48}
    with pytest.raises(ValueError, match="multiple of the patch size"):
        read_vision_checkpoint(model_cfg("clip", d, "model.vision.image_size=50"))


# --------------------------------------------------------------------------------------------
# Image processors
# --------------------------------------------------------------------------------------------


def test_image_processor_saved_and_default(tmp_path, blip2_dir, clip_dir):
    import numpy as np
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype("uint8"))
    for kind, (d, _) in (("blip2", blip2_dir), ("clip", clip_dir)):
        vis = VisionFrontEnd(model_cfg(kind, d))
        px = vis.image_processor()(images=[img, img], return_tensors="pt")["pixel_values"]
        assert px.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
        assert vis(pixel_values=px).shape[:2] == (2, vis.num_prefix_tokens)

        # Without preprocessor_config.json a standard processor of the kind is built from config.json.
        bare = tmp_path / f"bare_{kind}"
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(d / f, bare)
        proc = load_image_processor(model_cfg(kind, bare))
        saved = vis.image_processor()
        assert type(proc).__name__ == type(saved).__name__
        torch.testing.assert_close(
            proc(images=[img], return_tensors="pt")["pixel_values"],
            saved(images=[img], return_tensors="pt")["pixel_values"],
        )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_directory_and_wrong_model_type(tmp_path, blip2_dir, clip_dir):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=rf"directory {missing} does not exist.*'blip-2'"):
        VisionFrontEnd(model_cfg("blip2", missing))
    with pytest.raises(ValueError, match=rf"directory {missing} does not exist"):
        vision_prefix_length(model_cfg("clip", missing))
    # A CLIP directory given as BLIP-2 and vice versa: the message names the file and both model types.
    with pytest.raises(ValueError, match=r"config.json: model_type is 'clip_vision_model' but .*blip2.*'blip-2'"):
        VisionFrontEnd(model_cfg("blip2", clip_dir[0]))
    with pytest.raises(ValueError, match=r"model_type is 'blip-2' but .*clip.*'clip' or 'clip_vision_model'"):
        vision_embed_dim(model_cfg("clip", blip2_dir[0]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        VisionFrontEnd(model_cfg("clip", tmp_path / "empty"))
    with pytest.raises(ValueError, match="mks2.demo.resolve"):
        vision_prefix_length(model_cfg("clip", "demo"))
    assert vision_prefix_length(load_config(None, ["model.stage=base", "model.vision.kind=none"]).model) == 0


def _copy_with_state(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_bad_checkpoints_name_the_tensor(tmp_path, blip2_dir, clip_dir):
    bd, cd = blip2_dir[0], clip_dir[0]
    d = _copy_with_state(bd, tmp_path / "missing", lambda s: s.pop("qformer.layernorm.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) of the blip2 vision tower: qformer.layernorm.weight"):
        VisionFrontEnd(model_cfg("blip2", d))

    def reshape(s):
        s["query_tokens"] = torch.zeros(1, 5, TINY_QFORMER_HIDDEN)

    d = _copy_with_state(bd, tmp_path / "shape", reshape)
    bad_shape = r"'query_tokens' \(in model.safetensors\) has shape \(1, 5, 24\) .* expects \(1, 4, 24\)"
    with pytest.raises(ValueError, match=bad_shape):
        VisionFrontEnd(model_cfg("blip2", d))

    def extra(s):
        s["encoder.layers.7.mlp.fc1.weight"] = torch.zeros(2, 2)

    d = _copy_with_state(cd, tmp_path / "extra", extra)
    with pytest.raises(ValueError, match=r"has unexpected 1 tensor\(s\) of the clip vision tower: encoder.layers.7"):
        VisionFrontEnd(model_cfg("clip", d))

    def both(s):  # every problem in one message
        s.pop("post_layernorm.bias")
        extra(s)

    d = _copy_with_state(cd, tmp_path / "both", both)
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) .*: vision_model.post_layernorm.bias; has unexpected 1"):
        VisionFrontEnd(model_cfg("clip", d))

    (tmp_path / "noweights").mkdir()
    shutil.copy(cd / "config.json", tmp_path / "noweights")
    with pytest.raises(ValueError, match="no weights found"):
        VisionFrontEnd(model_cfg("clip", tmp_path / "noweights"))

    # Building without weights needs only config.json.
    vis = VisionFrontEnd(model_cfg("clip", tmp_path / "noweights"), load_weights=False)
    assert vis(pixel_values=pixels(1)).shape == (1, NUM_PATCHES, HIDDEN)


def test_weight_gather_is_opened_around_each_tower_tensor(clip_dir):
    d, _ = clip_dir
    opened: list[tuple[int, ...]] = []

    class Gather:
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            opened.append(tuple(self.params[0].shape))

        def __exit__(self, *exc):
            return False

    vis = VisionFrontEnd(model_cfg("clip", d), weight_gather=Gather)
    n_tower = sum(1 for n, _ in vis.named_parameters() if not n.startswith("mapping."))
    assert len(opened) == n_tower


def test_config_json_only_for_prefix_length(tmp_path, blip2_dir):
    # The collator's helpers must not need the weights: config.json alone is enough.
    (tmp_path / "cfg_only").mkdir()
    raw = json.loads((blip2_dir[0] / "config.json").read_text())
    raw["num_query_tokens"] = 7
    (tmp_path / "cfg_only" / "config.json").write_text(json.dumps(raw))
    cfg = model_cfg("blip2", tmp_path / "cfg_only")
    assert vision_prefix_length(cfg) == 7
    assert vision_embed_dim(cfg) == TINY_VISION_HIDDEN


# --------------------------------------------------------------------------------------------
# Retrieval head
# --------------------------------------------------------------------------------------------


def test_retrieval_head():
    torch.manual_seed(0)
    head = RetrievalHead(16, 8)
    assert head.proj.bias is None and head.proj.weight.shape == (8, 16)
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.scale().item() == pytest.approx(100.0)

    h = torch.randn(3, 5, 16)
    eos = torch.tensor([4, 0, 2])
    out = head.encode_text(h, eos)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    want = torch.nn.functional.normalize(h[torch.arange(3), eos] @ head.proj.weight.T, dim=-1)
    torch.testing.assert_close(out, want)
    # Only the EOS position matters.
    h2 = h.clone()
    h2[0, :4] += 1.0
    torch.testing.assert_close(head.encode_text(h2, eos)[0], out[0])
    img = head.encode_image(torch.randn(3, 8) * 7)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="eos_index"):
        head.encode_text(h, eos[:2])

    # The clamp stops the temperature's gradient above 100; below it the gradient flows.
    head.scale().backward()
    assert head.logit_scale.grad.item() == 0.0
    head.logit_scale.grad = None
    with torch.no_grad():
        head.logit_scale.fill_(1.0)
    head.scale().backward()
    assert head.logit_scale.grad.item() == pytest.approx(math.e, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Captioning loss through the whole model (image prefix spliced at the placeholders)
# --------------------------------------------------------------------------------------------

IMG = -200  # model.vision.image_token_id default


def _caption_batch(p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows ``prompt + P image placeholders + caption + EOS`` as a collator lays them
    out: labels only on the caption (and EOS), -100 on prompt, prefix and padding."""
    rows = [([5, 6, 7], [10, 11, 12, 2]), ([8], [20, 21, 2])]
    seq = max(len(a) + p + len(c) for a, c in rows) + 2
    ids = torch.zeros(2, seq, dtype=torch.long)
    labels = torch.full((2, seq), -100)
    mask = torch.zeros(2, seq, dtype=torch.long)
    ignored = torch.zeros(2, seq, dtype=torch.bool)  # prompt + prefix positions (not padding)
    for b, (prompt, caption) in enumerate(rows):
        row = prompt + [IMG] * p + caption
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        start = len(prompt) + p
        labels[b, start : len(row)] = torch.tensor(caption)
        ignored[b, :start] = True
    return ids, labels, mask, ignored


@pytest.mark.parametrize("kind", ["blip2", "clip"])
def test_captioning_loss_counts_caption_tokens_only(tmp_path, kind, blip2_dir, clip_dir):
    from mks2 import build_model

    hf_llama = make_tiny_llama(tmp_path / "llama")
    vdir = blip2_dir[0] if kind == "blip2" else clip_dir[0]
    cfg = load_config(
        None,
        [
            "model.stage=mvm",
            f"model.init_from={tmp_path / 'llama'}",
            f"model.vision.kind={kind}",
            f"model.vision.path={vdir}",
        ],
    )
    model = build_model(cfg)
    p = vision_prefix_length(cfg.model)
    ids, labels, mask, ignored = _caption_batch(p)
    px = pixels(2, seed=11)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=px)
    n_caption = int((labels != -100).sum())
    assert int(out.aux["num_loss_tokens"]) == n_caption == 7

    # By hand: mean over caption tokens of -log p(token | everything before it).
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, ids.shape[1]) if labels[b, t] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)

    # Independent reference: transformers' Llama on the same embeddings (prefix spliced at the
    # placeholders) with the same labels. A fresh stage-1 model computes the base Llama's function.
    with torch.no_grad():
        embeds = hf_llama.get_input_embeddings()(ids.clamp(min=0))
        embeds[ids == IMG] = model.vision(pixel_values=px).reshape(-1, embeds.shape[-1])
        ref = hf_llama(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)

    # Labels on prompt/prefix positions WOULD change the loss; -100 there removes them completely:
    # no gradient reaches the logits that predict a prompt or prefix position.
    noisy = labels.clone()
    noisy[ignored] = torch.randint(0, 100, (int(ignored.sum()),), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask, labels=noisy, pixel_values=px).loss, out.loss)
    logits = out.logits.detach().requires_grad_(True)
    from mks2.model import causal_lm_loss

    (grad,) = torch.autograd.grad(causal_lm_loss(logits, labels)[0], logits)
    predicts_ignored = torch.zeros_like(ignored)
    predicts_ignored[:, :-1] = ignored[:, 1:] | (mask[:, 1:] == 0)  # position t predicts token t + 1
    assert grad[predicts_ignored].abs().max() == 0
    assert (grad[~predicts_ignored & (mask == 1)].abs().sum(-1) > 0).sum() == n_caption

    # The image matters for the caption loss, precomputed features give the same loss, and the
    # trainable mapping and MVM get gradients while the towers get none.
    other = model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels(2, seed=12)).loss
    assert not torch.allclose(other, out.loss)
    feats = model.vision.encode(px).features
    again = model(input_ids=ids, attention_mask=mask, labels=labels, vision_features=feats)
    torch.testing.assert_close(again.loss, out.loss, atol=1e-6, rtol=1e-6)
    again.loss.backward()
    grads = {n for n, q in model.named_parameters() if q.grad is not None and q.grad.abs().sum() > 0}
    assert "vision.mapping.weight" in grads and any(".mvm." in n for n in grads)
    assert not any(n.startswith("vision.") and not n.startswith("vision.mapping.") for n in grads)


@pytest.mark.parametrize("kind", ["blip2", "clip"])
def test_mapping_only_front_end_has_no_tower_and_the_same_init(kind, blip2_dir, clip_dir):
    """towers=False (zero3: the towers run in a replicated copy outside the engine): nothing but the mapping
    is built, encode refuses, and the random init of what follows the towers is the one a full build gives
    (their constructors draw torch.randn: the build must not shift the RNG)."""
    d = (blip2_dir if kind == "blip2" else clip_dir)[0]
    cfg = model_cfg(kind, d)
    torch.manual_seed(3)
    full = VisionFrontEnd(cfg)
    after_full = torch.rand(4)
    torch.manual_seed(3)
    alone = VisionFrontEnd(cfg, towers=False)
    assert torch.equal(torch.rand(4), after_full)
    assert [n for n, _ in alone.named_parameters()] == ["mapping.weight", "mapping.bias"]
    assert torch.equal(alone.mapping.weight, full.mapping.weight)
    features = torch.randn(2, alone.num_prefix_tokens, alone.feature_dim)
    assert torch.equal(alone(vision_features=features), full(vision_features=features))
    with pytest.raises(ValueError, match="mapping only"):
        alone.encode(pixels(1))
    alone.train()  # no tower to put in eval mode: must not fail
