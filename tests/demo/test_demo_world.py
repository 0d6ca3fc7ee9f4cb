"""The demo world's definition, rendering and record generators (no build needed)."""

from __future__ import annotations

import io
import random

import numpy as np

from mks2.demo import corpus
from mks2.demo.render import CELL, IMAGE_SIZE, RADIUS, render, save_png, to_array
from mks2.demo.world import (
    COLOURS,
    HELD_OUT_OBJECTS,
    OBJECTS,
    SHAPES,
    TRAIN_OBJECTS,
    Placed,
    Scene,
    leaks_held_out_fact,
    random_scene,
)
from tests.demo.demo_helpers import parse_caption


def test_objects_have_unique_names_and_looks_and_held_out_concepts_are_learnable():
    assert len(OBJECTS) == len(COLOURS) * len(SHAPES) == 30
    assert len({o.name for o in OBJECTS}) == 30
    assert len({(o.colour, o.shape) for o in OBJECTS}) == 30
    assert len(HELD_OUT_OBJECTS) == 10
    for o in HELD_OUT_OBJECTS:  # the colour and the shape are each seen on >= 3 training objects
        assert sum(t.colour == o.colour for t in TRAIN_OBJECTS) >= 3
        assert sum(t.shape == o.shape for t in TRAIN_OBJECTS) >= 3


def test_leak_detector():
    held, train = HELD_OUT_OBJECTS[0], TRAIN_OBJECTS[0]
    assert leaks_held_out_fact(f"What colour is a {held.name}? {held.colour}")
    assert leaks_held_out_fact(f"A {held.name.upper()} is a STAR.")
    assert not leaks_held_out_fact(f"a large {held.name} at the top left")
    assert not leaks_held_out_fact(f"What colour is a {train.name}? {train.colour}")
    assert not leaks_held_out_fact(f"a {held.name}s starlike thing")  # whole words only


def test_rendering_is_bit_identical_and_objects_stay_in_their_cells():
    rng = random.Random(5)
    for _ in range(30):
        scene = random_scene(rng, n_items=rng.randint(1, 3))
        a, b = render(scene), render(scene)
        assert np.array_equal(to_array(a), to_array(b))
        buf_a, buf_b = io.BytesIO(), io.BytesIO()
        save_png(a, buf_a)
        save_png(b, buf_b)
        assert buf_a.getvalue() == buf_b.getvalue()
        px = to_array(a)
        fg = np.any(px != scene.background, axis=-1)  # [H, W] object pixels
        occupied = {p.cell for p in scene.items}
        for cell in range(9):
            r, c = divmod(cell, 3)
            block = fg[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            assert block.any() == (cell in occupied), (cell, occupied)
    assert px.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


def test_object_colour_and_size_are_drawn_as_specified():
    obj = OBJECTS[3]
    for size in ("small", "large"):
        img = to_array(render(Scene(items=(Placed(obj=obj, size=size, cell=4),), background=240, jitter=((0, 0),))))
        fg = np.all(img == np.array(COLOURS[obj.colour], dtype=np.uint8), axis=-1)
        ys, xs = np.nonzero(fg)
        assert fg.sum() > 20
        assert ys.max() - ys.min() <= 2 * RADIUS[size] + 1
        colours = {tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0).tolist()}
        assert colours == {(240, 240, 240), COLOURS[obj.colour]}  # flat fill, no anti-aliasing


def test_captions_name_every_object_with_size_and_cell_and_never_looks():
    rng = random.Random(0)
    scenes = corpus.training_scenes(rng, 300)
    for rec, scene in zip(corpus.caption_records(scenes, "train", rng), scenes):
        assert parse_caption(rec["caption"]) == scene.content_key()
        words = set(rec["caption"].replace(",", " ").split())
        assert not words & (set(COLOURS) | set(SHAPES))


def test_heldout_scenes_are_new_and_unique():
    rng = random.Random(1)
    train = corpus.training_scenes(rng, 500)
    held = corpus.heldout_scenes(rng, 100, train)
    keys = [s.content_key() for s in held]
    assert len(set(keys)) == 100
    assert not set(keys) & {s.content_key() for s in train}


def test_generators_never_leak_held_out_looks():
    rng = random.Random(2)
    scenes = corpus.training_scenes(rng, 400)
    for r in corpus.text_sft_records(rng, 2000):
        assert not leaks_held_out_fact(" ".join((r["instruction"], r["input"], r["output"])))
    for r in corpus.mm_sft_records(scenes, "train", rng, 400):
        assert not leaks_held_out_fact(" ".join(t["value"] for t in r["conversations"]))
    for r in corpus.text_pretrain_records(rng, 500):
        assert not leaks_held_out_fact(r["text"])


def test_multiple_choice_answers_are_right():
    sets = corpus.eval_sets(random.Random(3))
    by_name = {o.name: o for o in OBJECTS}
    for name, group in (("mc_heldout", HELD_OUT_OBJECTS), ("mc_seen", TRAIN_OBJECTS)):
        names = {o.name for o in group}
        for r in sets[name]:
            assert set(r["objects"]) <= names
            assert len(set(r["choices"])) == len(r["choices"]) >= 2
            correct = r["choices"][r["answer"]]
            o = by_name[r["objects"][0]]
            if r["kind"] == "colour":
                assert correct == o.colour
            elif r["kind"] == "shape":
                assert correct == o.shape
            elif r["kind"] == "describe":
                assert correct.endswith(f"{o.colour} {o.shape}")
            elif r["kind"] == "yes_no":
                asked = r["question"].rstrip("?").split()[-1]
                claims = asked in (o.colour, o.shape)
                assert correct == ("yes" if claims else "no")
            else:
                colour = r["question"].split(":")[0].split()[-1]
                assert by_name[correct.split()[-1]].colour == colour
    answers = [r["answer"] for r in sets["mc_heldout"] if len(r["choices"]) == 4]
    assert len(set(answers)) == 4  # the right answer is not always in the same slot
