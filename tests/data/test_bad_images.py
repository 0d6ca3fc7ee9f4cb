"""Undecodable images at training time: a tagged placeholder, no loss on the sample, the file named once the
batch is handed out; batches otherwise identical to a run on good files (in-process, no launch). The real
2-rank run with a corrupt file is tests/training/test_bad_images_run.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessorPil

from mks2.config import VisionKind
from mks2.constants import IGNORE_INDEX
from mks2.data.errors import DatasetError
from mks2.data.images import ImageLoader, find_placeholders, placeholder
from mks2.data.loader import build_dataloader
from mks2.data.pretokenize import pretokenize
from mks2.training.losses import contrastive_loss, contrastive_sums
from tests.data.data_helpers import caption_records, run_config, write_images, write_jsonl

P = 4


def test_placeholder_tag_round_trip_and_a_long_note_is_cut_from_the_left():
    real = torch.rand(2, 3, 8, 8)
    long_note = "/" + "d" * 400 + "/x.png (OSError: truncated)"
    short, long = placeholder((3, 8, 8), "a.png (OSError: x)"), placeholder((3, 8, 8), long_note)
    batch = torch.stack([real[0], short, real[1], long])
    hit, notes = find_placeholders(batch)
    assert hit.tolist() == [False, True, False, True]
    assert notes[0] == "a.png (OSError: x)"
    assert notes[1].startswith("...") and notes[1].endswith("d/x.png (OSError: truncated)")
    assert len(notes[1].encode()) == 3 * 8 * 8 - 17  # all the room after the tag and the length


def _batches(root, sp_model, n: int) -> list[dict]:
    cfg = run_config([str(root / "cap")], tokenizer=str(sp_model), seq_len=32)
    cfg.model.vision.kind = VisionKind.CLIP
    cfg.model.vision.path = "unused-by-the-loader"
    processor = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    loader = build_dataloader(cfg, rank=0, world_size=1, stage="mvm", image_processor=processor, num_prefix_tokens=P)
    out = []
    for batch in itertools.islice(iter(loader), n):
        out.append({**batch, "skipped": loader.take_skipped_images()})
    return out


def test_an_undecodable_image_masks_its_sample_and_nothing_else(tmp_path, sp_model):
    write_images(tmp_path / "images", 12)
    pretokenize([str(write_jsonl(tmp_path / "cap.jsonl", caption_records(12)))], fmt="caption", tokenizer=str(sp_model),
                output=str(tmp_path / "cap"), image_root=str(tmp_path / "images"), progress=False)  # fmt: skip
    good = _batches(tmp_path, sp_model, 3)  # 12 captions in batches of 4: every image once
    assert all(b["skipped"] == [] for b in good)
    bad_file = tmp_path / "images" / "img" / "5.png"
    bad_file.write_bytes(b"\x89PNG\r\n\x1a\n truncated after pretokenize")  # broken after its check passed
    bad = _batches(tmp_path, sp_model, 3)

    hits = [(k, row) for k, b in enumerate(bad) for row in torch.nonzero(find_placeholders(b["pixel_values"])[0])]
    assert len(hits) == 1
    k, row = hits[0][0], int(hits[0][1])
    assert len(bad[k]["skipped"]) == 1 and str(bad_file) in bad[k]["skipped"][0]
    assert sum(len(b["skipped"]) for b in bad) == 1
    for j, (g, b) in enumerate(zip(good, bad)):
        assert g.keys() - {"skipped"} == b.keys() - {"skipped"}
        for key in g.keys() - {"skipped", "labels", "pixel_values"}:
            assert torch.equal(g[key], b[key]), key  # same samples, same layout, same retrieval view
        others = [r for r in range(g["labels"].shape[0]) if (j, r) != (k, row)]
        assert torch.equal(g["labels"][others], b["labels"][others])
        assert torch.equal(g["pixel_values"][others], b["pixel_values"][others])
    assert (good[k]["labels"][row] != IGNORE_INDEX).any()  # the good run trains on that caption
    strict = ImageLoader(CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
                         str(tmp_path / "images"))  # fmt: skip
    with pytest.raises(DatasetError, match=r"q.jsonl:3: cannot load image .*5.png"):
        strict("img/5.png", where="q.jsonl:3")  # the evaluators' loading stays strict: one line, not a placeholder
    assert (bad[k]["labels"][row] == IGNORE_INDEX).all()  # no caption loss on the skipped sample


def test_a_zero_image_embedding_takes_no_part_in_the_retrieval_loss():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    image = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(2.0)
    expected, expected_acc = contrastive_loss(text[[0, 1, 3]], image[[0, 1, 3]], scale)
    masked = image.clone()
    masked[2] = 0  # what the frozen front-end gives for a placeholder
    loss, acc = contrastive_loss(text, masked, scale)
    assert torch.allclose(loss, expected) and torch.allclose(acc, expected_acc)
    sums = contrastive_sums(text[[0, 1, 3]], image[[0, 1, 3]], scale)  # the packed layout's sums
    assert all(torch.allclose(a, b) for a, b in zip(contrastive_sums(text, masked, scale), sums))
    none = text.clone().requires_grad_()
    loss0, _ = contrastive_loss(none, torch.zeros(4, 8), scale)  # a micro-batch of only bad images
    loss0.backward()
    assert loss0.item() == 0.0 and torch.isfinite(none.grad).all() and not none.grad.any()
