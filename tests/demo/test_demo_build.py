"""The built demo world: files, shards, tokenizer, held-out splits and the no-leak rule."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pytest
import sentencepiece as spm

from mks2 import load_config
from mks2.demo import NAMES, demo_path
from mks2.demo.builder import CHAT_TEMPLATES, MARKER
from mks2.demo.resolve import WORLD_ONLY
from mks2.demo.world import HELD_OUT_OBJECTS, TRAIN_OBJECTS, VISUAL_WORDS, leaks_held_out_fact, words
from tests.demo.demo_helpers import parse_caption, read_jsonl

SHARDS = ["captions", "captions_heldout", "text_pretrain"] + [
    f"{n}-{t}" for n in ("text_sft", "mm_sft", "sft_heldout", "mm_sft_heldout") for t in CHAT_TEMPLATES
]
RAW = {
    "captions": "caption",
    "captions_heldout": "caption",
    "text_sft": "alpaca",
    "mm_sft": "llava",
    "text_pretrain": "text",
    "sft_heldout": "alpaca",
    "mm_sft_heldout": "llava",
}


def _texts(root, name: str) -> list[str]:
    """All text of each raw training record of ``name`` (one string per record)."""
    out = []
    for r in read_jsonl(root / "raw" / f"{name}.jsonl"):
        if RAW[name] == "caption":
            out.append(r["caption"])
        elif RAW[name] == "alpaca":
            out.append(" ".join((r["instruction"], r["input"], r["output"])))
        elif RAW[name] == "llava":
            out.append(" ".join(t["value"] for t in r["conversations"]))
        else:
            out.append(r["text"])
    return out


def test_every_named_artefact_exists(demo_root):
    info = json.loads((demo_root / MARKER).read_text())
    for name in (n for n in NAMES if n not in WORLD_ONLY):  # the session's build is the no_leak world
        for template in CHAT_TEMPLATES:
            assert (demo_root / demo_path(demo_root, name, chat_template=template)).exists(), name
    assert info["records"]["captions"] == 4000 and info["records"]["captions_heldout"] >= 100
    assert len(list((demo_root / "images" / "train").glob("*.png"))) == 4000
    assert max(info["max_record_tokens"].values()) <= 128


def test_shards_open_with_pyarrow_and_datasets_and_match_the_raw_records(demo_root):
    from datasets import Dataset

    for name in SHARDS:
        manifest = json.loads((demo_root / "shards" / name / "manifest.json").read_text())
        raw = read_jsonl(demo_root / "raw" / f"{name.split('-')[0]}.jsonl")
        rows = 0
        for entry in manifest["shards"]:
            path = demo_root / "shards" / name / entry["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
            with pa.memory_map(str(path)) as f:
                table = pa.ipc.open_stream(f).read_all()
            assert {"input_ids", "loss_mask"} <= set(table.column_names)
            rows += table.num_rows
            assert Dataset.from_file(str(path)).num_rows == table.num_rows
        assert rows == len(raw) == manifest["counts"]["records_written"]
        if "image" in table.column_names:  # every image a shard names exists under the image root
            for image in table.column("image").to_pylist():
                assert (demo_root / "images" / image).is_file()


def test_shards_pass_the_loaders_checks_against_the_demo_config(demo_root):
    from mks2.data.dataset import PretokenizedDataset

    cfg = load_config(None)
    for name in SHARDS:
        ds = PretokenizedDataset(
            demo_root / "shards" / name,
            tokenizer=demo_root / "tokenizer",
            vocab_size=cfg.model.vocab_size,
            image_token_id=cfg.model.vision.image_token_id,
        )
        assert len(ds) > 0


def test_tokenizer_has_llama_special_ids_and_fits_the_demo_model(demo_root):
    sp = spm.SentencePieceProcessor(model_file=str(demo_root / "tokenizer" / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == load_config(None).model.vocab_size  # configs/demo.yaml matches
    # Every word of the world (evaluation questions included) is one piece: compact and no <unk>.
    for r in read_jsonl(demo_root / "eval" / "mc_heldout.jsonl"):
        for choice in r["choices"]:
            pieces = sp.encode(r["question"] + " " + choice, out_type=str)
            assert len(pieces) <= len((r["question"] + " " + choice).split()) + 4, pieces
            assert not any(p.startswith("<0x") or p == "<unk>" for p in pieces)


def test_tokenizer_directory_loads_with_autotokenizer_identically(demo_root):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(demo_root / "tokenizer" / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(demo_root / "tokenizer"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    for text in _texts(demo_root, "text_sft")[:20]:
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_heldout_gallery_is_disjoint_from_training(demo_root):
    train = read_jsonl(demo_root / "raw" / "captions.jsonl")
    held = read_jsonl(demo_root / "raw" / "captions_heldout.jsonl")
    assert len(held) >= 100
    held_keys = [parse_caption(r["caption"]) for r in held]
    assert all(len(k) == 2 for k in held_keys)
    assert len(set(held_keys)) == len(held)  # exactly one matching image per held-out caption
    assert not set(held_keys) & {parse_caption(r["caption"]) for r in train}
    assert not {r["caption"] for r in held} & {r["caption"] for r in train}

    def digests(records):
        return {hashlib.sha256((demo_root / "images" / r["image"]).read_bytes()).hexdigest() for r in records}

    assert not digests(held) & digests(train)
    assert all(r["image"].startswith("heldout/") for r in held)
    mm_images = {r["image"] for r in read_jsonl(demo_root / "raw" / "mm_sft.jsonl")}
    assert mm_images <= {r["image"] for r in train}


@pytest.mark.parametrize("name", list(RAW))
def test_no_training_text_links_a_held_out_name_to_its_looks(demo_root, name):
    texts = _texts(demo_root, name)
    assert texts
    leaks = [t for t in texts if leaks_held_out_fact(t)]
    assert not leaks, leaks[:3]
    names = {o.name for o in TRAIN_OBJECTS + HELD_OUT_OBJECTS}
    if name in ("text_sft", "text_pretrain"):  # no_leak world: no looks in text at all, not even seen objects'
        assert not [t for t in texts if words(t) & names and words(t) & VISUAL_WORDS][:3]
        assert any(w & {o.name for o in HELD_OUT_OBJECTS} for w in map(words, texts))  # names are known
    if name == "mm_sft":  # ... the training objects' looks are taught with their image, by name
        taught = {o.name for o in TRAIN_OBJECTS if any({o.name, o.colour} <= words(t) for t in texts)}
        assert taught == {o.name for o in TRAIN_OBJECTS}
    if name.startswith("captions"):
        assert not any(words(t) & VISUAL_WORDS for t in texts)


def test_eval_sets_ask_about_looks_seen_only_in_images(demo_root):
    world = json.loads((demo_root / "world.json").read_text())
    held = {o["name"]: o for o in world["objects"] if o["held_out"]}
    assert set(held) == {o.name for o in HELD_OUT_OBJECTS}
    mc = read_jsonl(demo_root / "eval" / "mc_heldout.jsonl")
    assert len(mc) >= 100
    for r in mc:
        assert set(r["objects"]) <= set(held)
        assert 0 <= r["answer"] < len(r["choices"])
        if r["kind"] == "colour":
            assert r["choices"][r["answer"]] == held[r["objects"][0]]["colour"]
    for r in read_jsonl(demo_root / "eval" / "open_heldout.jsonl"):
        assert r["object"] in held and all(k in VISUAL_WORDS for k in r["keywords"])
    seen = read_jsonl(demo_root / "eval" / "mc_seen.jsonl")
    assert {n for r in seen for n in r["objects"]} == {o.name for o in TRAIN_OBJECTS}
