"""The two demo worlds (``no_leak``, ``paper``): what each writes where, the leak check that fails a build,
and deterministic tiny builds of both."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mks2.config import load_config
from mks2.demo import builder, corpus
from mks2.demo.builder import DemoSizes, build, build_dir_name, generate_records
from mks2.demo.leaks import DemoLeakError, check_no_leak, record_leak
from mks2.demo.world import FACTS, HELD_OUT_OBJECTS, OBJECTS, TRAIN_OBJECTS, VISUAL_WORDS, words
from mks2.errors import UserError
from tests.demo.test_demo_determinism import _digests

TINY = DemoSizes(
    n_train_images=40, n_heldout_images=8, n_text_sft=40, n_mm_sft=20, n_text_pretrain=30,
    n_sft_heldout=10, n_mm_sft_heldout=5, tower_steps=3, tower_images=64,
)  # fmt: skip
NAMES = {o.name for o in OBJECTS}
HELD = {o.name for o in HELD_OUT_OBJECTS}


def _text(rec: dict) -> str:
    return (
        " ".join(str(v) for k, v in rec.items() if k not in ("id", "image") and not isinstance(v, list))
        + " "
        + " ".join(t["value"] for t in rec.get("conversations", []))
    )


@pytest.fixture(scope="module")
def worlds() -> dict[str, dict]:
    """Full-size records of both worlds (generation only: ~2 s each)."""
    return {w: generate_records(DemoSizes(), w)[2] for w in ("no_leak", "paper")}


def test_no_leak_world_states_no_looks_in_text_and_facts_of_every_object(worlds):
    raw = worlds["no_leak"]
    assert check_no_leak(raw, "no_leak") == sum(len(v) for v in raw.values())  # every dataset, captions too
    for name in ("text_sft", "text_pretrain", "sft_heldout", "captions"):  # no looks of ANY object in text
        assert not [r for r in raw[name] if words(_text(r)) & NAMES and words(_text(r)) & VISUAL_WORDS][:3], name
    # every object, held-out ones too, has its facts asked in the instructions and stated in the corpus...
    for name in ("text_sft", "text_pretrain"):
        texts = [words(_text(r)) for r in raw[name]]
        for o in OBJECTS:
            f = FACTS[o.name]
            assert any({o.name, f.home} <= w for w in texts), (name, o.name)

    def answers(n: str) -> set[str]:
        f = FACTS[n]
        return {f.sound, f"in the {f.home}", f.weight}

    asked = {n for r in raw["text_sft"] for n in words(r["instruction"] + " " + r["input"]) & NAMES
             if r["output"] in answers(n)}  # fmt: skip
    assert HELD <= asked
    # ... the training objects' looks only with their image, by name ("What colour is this zorp?")
    taught = {o.name for o in TRAIN_OBJECTS for r in raw["mm_sft"] if {o.name, o.colour} <= words(_text(r))}
    assert taught == {o.name for o in TRAIN_OBJECTS}
    # stage 1 retrieves single-object images from the name alone
    assert any(r["caption"] in (f"a {n}", f"a large {n}", f"a small {n}") for r in raw["captions"] for n in HELD)


def test_paper_world_captions_describe_looks_and_no_stage2_or_base_text_does(worlds):
    raw = worlds["paper"]
    check_no_leak(raw, "paper")
    held = HELD_OUT_OBJECTS[0]
    caps = [r["caption"] for r in raw["captions"]]
    before = f"{held.colour} {held.shape} {held.name}"  # looks before the name ...
    after = f"{held.name} "  # ... and after it: "a large zorp at the top left, red and star-shaped"
    assert any(before in c for c in caps)
    assert any(after in c and f", {held.colour} and {held.shape}-shaped" in c for c in caps)
    with pytest.raises(DemoLeakError):  # those captions would leak in any text dataset
        check_no_leak({"text_sft": raw["captions"]}, "paper")
    assert raw["captions_noimage"][0]["caption"] == raw["captions"][0]["caption"]
    assert {r["image"] for r in raw["captions_noimage"]} == {corpus.BLANK_IMAGE}
    for name in ("text_sft", "mm_sft", "text_pretrain", "sft_heldout", "mm_sft_heldout"):
        assert not [r for r in raw[name] if record_leak(r)], name
    # the training objects' looks are stated in the base-LM corpus and the text instructions
    for name in ("text_pretrain", "text_sft"):
        told = {o.name for o in TRAIN_OBJECTS for r in raw[name] if {o.name, o.colour} <= words(_text(r))}
        assert told == {o.name for o in TRAIN_OBJECTS}, name
    # one-object scenes are sometimes captioned by the name alone (retrieval from the name), held-out ones too
    assert any(r["caption"] in (f"a {n}", f"a large {n}", f"a small {n}") for r in raw["captions"] for n in HELD)


def test_heldout_instructions_repeat_no_training_record(worlds):
    for raw in worlds.values():
        train = {(r["instruction"], r["input"], r["output"]) for r in raw["text_sft"]}
        held = [(r["instruction"], r["input"], r["output"]) for r in raw["sft_heldout"]]
        assert len(held) == 200 and not set(held) & train
        assert all(r["image"].startswith("heldout/") for r in raw["mm_sft_heldout"])


@pytest.mark.parametrize("world,dataset", [("no_leak", "text_sft"), ("paper", "text_pretrain"), ("paper", "mm_sft")])
def test_a_planted_leak_fails_the_build_before_anything_is_written(tmp_path, monkeypatch, world, dataset):
    held = HELD_OUT_OBJECTS[3]
    original = builder.generate_records

    def leaky(sizes, w):
        train, heldout, raw, evals = original(sizes, w)
        raw[dataset] = [*raw[dataset][:5], {"id": "planted", "text": f"a {held.name} is {held.colour}."}]
        return train, heldout, raw, evals

    monkeypatch.setattr(builder, "generate_records", leaky)
    root = tmp_path / "build"
    with pytest.raises(DemoLeakError, match=rf"{dataset!r} record 5 \(id 'planted'\).*{held.name}") as err:
        build(root, TINY, progress=False, world=world)
    assert isinstance(err.value, UserError) and not root.exists()


@pytest.mark.parametrize("world", ["no_leak", "paper"])
def test_tiny_builds_of_both_worlds_are_byte_identical(tmp_path, world):
    a, b = tmp_path / "a", tmp_path / "b"
    info = build(a, TINY, progress=False, world=world)
    build(b, TINY, progress=False, world=world)
    da, db = _digests(a), _digests(b)
    assert da.keys() == db.keys() and [n for n in da if da[n] != db[n]] == []
    assert info["world"] == world and info["leak_check"]["records_checked"] > 0
    assert ("shards/captions_noimage/manifest.json" in da) == (world == "paper")
    assert "shards/sft_heldout-llama2/manifest.json" in da


def test_the_world_names_the_cache_directory_and_is_validated(tmp_path, monkeypatch):
    assert build_dir_name("paper") != build_dir_name() and "-paper-" in build_dir_name("paper")
    assert builder.fingerprint("paper") != builder.fingerprint("no_leak")
    calls = []

    def fake_ensure(cache, *, progress=True, world="no_leak"):
        calls.append(world)
        return tmp_path / world, False

    resolve_mod = importlib.import_module("mks2.demo.resolve")  # the module (the package exports a function)

    monkeypatch.setattr(resolve_mod, "ensure_built", fake_ensure)
    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo_stage2.yaml", ["data.demo_world=paper"])
    out = resolve_mod.resolve(cfg, progress=False)
    assert calls == ["paper"] and all(str(s.path).startswith(str(tmp_path / "paper")) for s in out.data.eval_datasets)
    assert [s.path.rsplit("/", 1)[1] for s in out.data.eval_datasets] == ["sft_heldout-llama2", "mm_sft_heldout-llama2"]
    with pytest.raises(ValueError, match="only in the 'paper' demo world"):
        resolve_mod.resolve(load_config(None, ["data.datasets=[demo:captions_noimage]"]), progress=False)
    with pytest.raises(UserError, match="data.demo_world"):
        load_config(None, ["data.demo_world=nope"])
