"""Image placeholders: splicing order, count checks, pixel vs precomputed features, retrieval helpers."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import TINY_IMAGE_SIZE, make_tiny_blip2, make_tiny_llama_and_clip
from tests.model.model_helpers import build, random_ids, tiny_llama

IMG = -200
P = 16  # tiny CLIP: (32 / 8)^2 patches


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    llama, clip = make_tiny_llama_and_clip(tmp_path_factory)
    return build(llama, "model.stage=mvm", vision_dir=clip)


def batch_with_images():
    """Row 0: 3 text tokens, image A, 2 text tokens, padding; row 1: image B then 4 text tokens."""
    s = 3 + P + 2 + 3
    ids = torch.zeros(2, s, dtype=torch.long)
    mask = torch.ones(2, s, dtype=torch.long)
    ids[0, :3], ids[0, 3 : 3 + P], ids[0, 3 + P : 5 + P] = random_ids(1, 3)[0], IMG, random_ids(1, 2, seed=1)[0]
    mask[0, 5 + P :] = 0
    ids[1, :P], ids[1, P:] = IMG, random_ids(1, s - P, seed=2)[0]
    return ids, mask


def pixels(n, seed=0):
    return torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def test_prefix_is_spliced_row_major(model):
    ids, _ = batch_with_images()
    feats = torch.randn(2, P, model.vision.feature_dim)
    with torch.no_grad():
        emb = model.embed(ids, vision_features=feats)
        prefix = model.vision(vision_features=feats)  # [2, P, D]
        torch.testing.assert_close(emb[0, 3 : 3 + P], prefix[0])
        torch.testing.assert_close(emb[1, :P], prefix[1])
        text = model.model.embed_tokens(ids.clamp(min=0))
        torch.testing.assert_close(emb[0, :3], text[0, :3])
        torch.testing.assert_close(emb[1, P:], text[1, P:])


def test_pixel_values_equal_precomputed_features(model):
    ids, mask = batch_with_images()
    px = pixels(2)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, pixel_values=px).logits
        b = model(ids, attention_mask=mask, vision_features=model.vision.encode(px).features).logits
        c = model(ids, attention_mask=mask, pixel_values=px.flip(0)).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # image order matters: image k goes to the k-th placeholder run


def test_image_gradient_reaches_mapping_only_through_prefix(model):
    ids, mask = batch_with_images()
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[mask == 0] = -100
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels, pixel_values=pixels(2))
    # Row 0: text at 1, 2 and 19, 20 is predicted (4); row 1: its 8 text tokens after the image (8).
    assert out.aux["num_loss_tokens"].item() == 4 + 8
    out.loss.backward()
    assert model.vision.mapping.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision.vision_model.parameters())
    model.zero_grad()


def test_placeholder_count_errors(model):
    ids, _ = batch_with_images()
    with pytest.raises(
        ValueError, match=r"32 image placeholder token\(s\) \(id -200\) but the batch has 1 image\(s\) x 16"
    ):
        model(ids, pixel_values=pixels(1))
    with pytest.raises(ValueError, match=r"hold 32 image placeholder.*0 image\(s\)"):
        model(ids)
    bad = ids.clone()
    bad[0, 0] = -5
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 128\).*first: -5"):
        model(bad, pixel_values=pixels(2))
    bad[0, 0] = 128
    with pytest.raises(ValueError, match="first: 128"):
        model(bad, pixel_values=pixels(2))


def test_images_on_text_only_model_are_rejected(tmp_path):
    tiny_llama(tmp_path)
    base = build(tmp_path, "model.stage=base")
    with pytest.raises(ValueError, match="no vision front-end"):
        base(random_ids(1, 4), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="no retrieval head"):
        base.encode_text_for_retrieval(torch.zeros(1, 4, 32), torch.tensor([3]))


def test_retrieval_helpers(model):
    ids = random_ids(3, 7)
    eos = torch.tensor([6, 4, 2])
    with torch.no_grad():
        hidden = model(ids, return_logits=False).hidden_states
        text = model.encode_text_for_retrieval(hidden, eos)
        manual = torch.nn.functional.normalize(model.retrieval.proj(hidden[torch.arange(3), eos]), dim=-1)
        image = model.encode_image_for_retrieval(pixels(3))
        pooled = model.vision.vision_model(pixel_values=pixels(3)).pooler_output
    assert text.shape == (3, model.vision.embed_dim) == image.shape
    torch.testing.assert_close(text, manual)
    torch.testing.assert_close(image, torch.nn.functional.normalize(pooled, dim=-1))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    assert model.retrieval.logit_scale.item() == pytest.approx(2.6592600)  # ln(1 / 0.07)


def test_blip2_prefix(tmp_path):
    llama, blip = tmp_path / "llama", tmp_path / "blip2"
    tiny_llama(llama)
    make_tiny_blip2(blip)
    model = build(llama, "model.stage=mome", "model.vision.kind=blip2", f"model.vision.path={blip}")
    q = model.vision.num_prefix_tokens
    ids = torch.cat([torch.full((1, q), IMG), random_ids(1, 5)], dim=1)
    out = model(ids, pixel_values=pixels(1))
    assert out.logits.shape == (1, q + 5, 128) and torch.isfinite(out.logits).all()
    assert set(out.aux["gates"]) == {0, 1}
