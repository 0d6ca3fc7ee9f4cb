"""The demo vision tower: loadable by transformers and by our vision front-end, and informative."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mks2.demo.vision import patch_labels, pixel_values, render_batch
from mks2.demo.world import OBJECTS, random_scene
from tests.demo.demo_helpers import caption_features, parse_caption, read_jsonl, ridge, softmax_probe_accuracy


@pytest.fixture(scope="module")
def tower(demo_root):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(demo_root / "vision")).eval()


@pytest.fixture(scope="module")
def single_object_scenes():
    rng = random.Random(1234)  # not the seeds the tower was trained on
    scenes = [random_scene(rng, n_items=1) for _ in range(600)]
    return scenes, pixel_values(render_batch(scenes))


def test_image_processor_reproduces_the_training_normalisation(demo_root):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(demo_root / "vision"))
    recs = read_jsonl(demo_root / "raw" / "captions_heldout.jsonl")[:4]
    images = [Image.open(demo_root / "images" / r["image"]).convert("RGB") for r in recs]
    got = proc(images=images, return_tensors="pt")["pixel_values"]
    want = pixel_values(np.stack([np.asarray(im) for im in images]))
    assert got.shape == want.shape == (4, 3, 96, 96)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_our_vision_front_end_reads_the_demo_tower(demo_cache):
    from mks2 import load_config
    from mks2.demo import resolve
    from mks2.model.vision import vision_embed_dim, vision_prefix_length

    cfg = resolve(load_config(None, [f"data.cache_dir={demo_cache}"]), progress=False)
    assert vision_prefix_length(cfg.model) == 9  # 3x3 patches, CLS dropped: fits data.seq_len=96
    assert vision_embed_dim(cfg.model) == 64


def test_pooled_output_separates_object_identities(tower, single_object_scenes):
    """Linear probe (30 objects, chance 3%) on the pooled CLS output of unseen single-object images;
    the pre-trained tower must beat a random tower of the same architecture by a wide margin."""
    from transformers import CLIPVisionModel

    scenes, px = single_object_scenes
    names = [o.name for o in OBJECTS]
    y = torch.tensor([names.index(s.items[0].obj.name) for s in scenes])
    with torch.no_grad():
        feats = tower(pixel_values=px).pooler_output
        torch.manual_seed(0)
        random_feats = CLIPVisionModel(tower.config).eval()(pixel_values=px).pooler_output
    acc = softmax_probe_accuracy(feats[:450], y[:450], feats[450:], y[450:], 30)
    random_acc = softmax_probe_accuracy(random_feats[:450], y[:450], random_feats[450:], y[450:], 30)
    print(f"\nobject-identity probe on the pooled output: pre-trained {acc:.3f}, random {random_acc:.3f}")
    assert acc >= 0.95, acc
    assert acc - random_acc >= 0.2, (acc, random_acc)


def test_prefix_patch_tokens_know_their_cell(tower, single_object_scenes, demo_root):
    """The captioning prefix (penultimate layer's patch tokens, model.vision.feature_layer=-2) tells
    per cell whether it is empty and which colour-shape it holds."""
    scenes, px = single_object_scenes
    with torch.no_grad():
        h = tower(pixel_values=px[:300], output_hidden_states=True).hidden_states[-2][:, 1:]  # [N, 9, 64]
    labels = torch.from_numpy(np.stack([patch_labels(s) for s in scenes[:300]]))[..., 0]  # [N, 9]
    x, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    acc = softmax_probe_accuracy(x[:1800], y[:1800], x[1800:], y[1800:], 31)
    print(f"\ncell-content probe on penultimate patch tokens: {acc:.3f}")
    assert acc >= 0.95, acc


def _linear_retrieval_recall(tower, demo_root: Path) -> tuple[float, float]:
    """Fit a linear map from an additive bag of caption facts to the pooled output on 2000 training
    pairs; return its (R@1, R@5) on the 100 held-out captions against the 100 held-out images."""
    train = read_jsonl(demo_root / "raw" / "captions.jsonl")[:2000]
    held = read_jsonl(demo_root / "raw" / "captions_heldout.jsonl")[:100]

    def pooled(records) -> np.ndarray:
        arr = np.stack([np.asarray(Image.open(demo_root / "images" / r["image"]).convert("RGB")) for r in records])
        with torch.no_grad():
            return tower(pixel_values=pixel_values(arr)).pooler_output.double().numpy()

    names = [o.name for o in OBJECTS]
    f_train, f_held = pooled(train), pooled(held)
    t_train = caption_features([parse_caption(r["caption"]) for r in train], names)
    t_held = caption_features([parse_caption(r["caption"]) for r in held], names)
    mean = f_train.mean(0)
    pred = t_held @ ridge(t_train, f_train - mean) + mean
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    f_held /= np.linalg.norm(f_held, axis=1, keepdims=True)
    ranks = np.argsort(-(pred @ f_held.T), axis=1)  # [100, 100] gallery order per caption
    hits = ranks == np.arange(len(held))[:, None]
    return float(hits[:, :1].any(1).mean()), float(hits[:, :5].any(1).mean())


def test_captions_linearly_retrieve_their_heldout_image(tower, demo_root):
    """What stage-1 retrieval needs: the right held-out image ranks first far above chance (1%), and
    pre-training is what makes it so."""
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    random_tower = CLIPVisionModel(tower.config).eval()
    r1, r5 = _linear_retrieval_recall(tower, demo_root)
    random_r1, random_r5 = _linear_retrieval_recall(random_tower, demo_root)
    print(f"\nlinear retrieval R@1/R@5: pre-trained {r1:.2f}/{r5:.2f}, random {random_r1:.2f}/{random_r5:.2f}")
    assert r1 >= 0.6, r1
    assert r1 - random_r1 >= 0.2, (r1, random_r1)


def test_pretraining_report(demo_root):
    report = json.loads((demo_root / "vision" / "pretraining.json").read_text())
    assert report["eval_patch_accuracy"] >= 0.95
