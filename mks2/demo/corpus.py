"""Text and record generation for the demo world (all pure functions of a seeded ``random.Random``).

Record formats are the ones ``mks2.data.pretokenize`` reads: ``caption`` ({image, caption}),
``alpaca`` ({instruction, input, output}), ``llava`` ({image, conversations: [{from, value}]}) and
``text`` ({text}); evaluation files are PIQA/OBQA-style multiple choice ({question, choices, answer})
and open questions ({question, answer, keywords}).

The one rule every generator obeys (and ``mks2.demo.leaks`` checks at every build): a record of a text
dataset never names a held-out object together with a colour or shape word. Only the ``paper`` world's
stage-1 captions (and their held-out gallery) may: there, captions describe appearance (``world.WORLDS``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mks2.demo.world import (
    CELL_NAMES,
    COLOURS,
    FACTS,
    HELD_OUT_OBJECTS,
    HOMES,
    NON_OBJECTS,
    NUMBER_WORDS,
    OBJECTS,
    POSITIONS,
    SHAPES,
    SOUNDS,
    TRAIN_OBJECTS,
    VISUAL_WORDS,
    Scene,
    WorldObject,
    article,
    caption,
    caption_with_looks,
    describe_item,
    leaks_held_out_fact,
    name_only_caption,
    random_scene,
    words,
)

Record = dict
QA = tuple[str, str]  # (question, answer)

COLOUR_Q = ("What colour is a {n}?", "What is the colour of a {n}?", "Which colour does a {n} have?")
SHAPE_Q = ("What shape is a {n}?", "What is the shape of a {n}?", "Which shape does a {n} have?")
DESCRIBE_Q = ("Describe a {n}.", "What does a {n} look like?")
SHORT_ANSWER = "Answer the question with a short answer."


def looks(obj: WorldObject) -> str:
    """'a red star' / 'an orange circle'."""
    return f"{article(obj.colour)} {obj.colour} {obj.shape}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------------------
# Stage 1: captions
# ------------------------------------------------------------------------------------------------

N_ITEMS_WEIGHTS = ((1, 0.3), (2, 0.5), (3, 0.2))


def training_scenes(rng: random.Random, n: int) -> list[Scene]:
    counts, weights = zip(*N_ITEMS_WEIGHTS)
    return [random_scene(rng, n_items=rng.choices(counts, weights)[0]) for _ in range(n)]


def heldout_scenes(rng: random.Random, n: int, train: Sequence[Scene]) -> list[Scene]:
    """Two-object scenes whose content (objects, sizes, cells) never occurs in training and is unique
    within the gallery, so every held-out caption has exactly one matching image."""
    seen = {s.content_key() for s in train}
    out: list[Scene] = []
    while len(out) < n:
        s = random_scene(rng, n_items=2)
        if s.content_key() not in seen:
            seen.add(s.content_key())
            out.append(s)
    return out


NAME_ONLY_FRACTION = 0.5
"""Both worlds: share of one-object training scenes captioned by the name alone ("a zorp"), as short
alt-text captions are. Their retrieval loss makes the name's own tokens predict the image embedding, so
the looks are written where a text-only question finds them (with a looks word in the caption, the
caption's EOS can match the image from that word instead)."""


def stage1_caption(scene: Scene, rng: random.Random, world: str, *, name_only: bool = False) -> str:
    if name_only and len(scene.items) == 1 and rng.random() < NAME_ONLY_FRACTION:
        return name_only_caption(scene, rng)
    return caption_with_looks(scene, rng) if world == "paper" else caption(scene, rng)


def caption_records(
    scenes: Sequence[Scene], split: str, rng: random.Random, world: str = "no_leak", *, name_only: bool = False
) -> list[Record]:
    """Stage-1 caption records of ``scenes`` (``name_only``: the training split, where one-object scenes may
    be captioned by the name alone in the no_leak world)."""
    return [
        {
            "id": f"{split}-{i:06d}",
            "image": image_path(split, i),
            "caption": stage1_caption(s, rng, world, name_only=name_only),
        }
        for i, s in enumerate(scenes)
    ]


BLANK_IMAGE = "blank.png"
"""The paper world's captions-without-images control: every record shows this one empty grey image."""


def blank_caption_records(records: Sequence[Record]) -> list[Record]:
    """The same captions, each with the one blank image (no visual information; see the builder)."""
    return [{**r, "id": r["id"].replace("train-", "noimage-"), "image": BLANK_IMAGE} for r in records]


def image_path(split: str, index: int) -> str:
    """Image path relative to the demo image root."""
    return f"{split}/{index:06d}.png"


# ------------------------------------------------------------------------------------------------
# Stage 2: text-only instructions (Alpaca style)
# ------------------------------------------------------------------------------------------------


def _visual_fact_qa(rng: random.Random) -> QA:
    """A question whose answer is the looks of a TRAINING object (these facts are allowed in text)."""
    o = rng.choice(TRAIN_OBJECTS)
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(COLOUR_Q).format(n=o.name), o.colour
    if kind == 1:
        return rng.choice(SHAPE_Q).format(n=o.name), o.shape
    if kind == 2:
        return rng.choice(DESCRIBE_Q).format(n=o.name), looks(o)
    if kind == 3:
        c = rng.choice([o.colour, rng.choice(list(COLOURS))])
        return f"Is a {o.name} {c}?", "yes" if c == o.colour else "no"
    if kind == 4:
        s = rng.choice([o.shape, rng.choice(SHAPES)])
        return f"Is a {o.name} {article(s)} {s}?", "yes" if s == o.shape else "no"
    if kind == 5:
        return f"Name {article(o.colour)} {o.colour} object.", o.name
    if kind == 6:
        return f"Name an object that is {article(o.shape)} {o.shape}.", o.name
    other = rng.choice([p for p in TRAIN_OBJECTS if p.colour != o.colour])
    pair = [o, other]
    rng.shuffle(pair)
    return f"Which one is {o.colour}: a {pair[0].name} or a {pair[1].name}?", f"a {o.name}"


def _scene_reasoning_qa(rng: random.Random) -> QA:
    """Questions about a scene described in words: any object, never its looks."""
    s = random_scene(rng, n_items=rng.choice((1, 2, 3)))
    desc = _join([describe_item(p) for p in s.items])
    kind = rng.randrange(4)
    if kind == 0:
        return f"A picture shows {desc}. How many objects are in it?", NUMBER_WORDS[len(s.items)]
    p = rng.choice(s.items)
    if kind == 1:
        return f"In a picture of {desc}, where is the {p.obj.name}?", POSITIONS[p.cell]
    if kind == 2:
        return f"In a picture of {desc}, what is {POSITIONS[p.cell]}?", f"a {p.size} {p.obj.name}"
    cell = rng.randrange(9)
    at = [q for q in s.items if q.cell == cell]
    answer = f"a {at[0].size} {at[0].obj.name}" if at else "nothing"
    return f"In a picture of {desc}, what is {POSITIONS[cell]}?", answer


def _comparison_qa(rng: random.Random) -> QA:
    a, b = rng.sample(OBJECTS, 2)
    kind = rng.randrange(3)
    if kind == 0:
        big = rng.choice((a, b))
        sa, sb = ("large", "small") if big is a else ("small", "large")
        return f"Which is bigger, a {sa} {a.name} or a {sb} {b.name}?", f"the {big.name}"
    ca, cb = rng.sample(range(9), 2)
    if kind == 1:
        while ca // 3 == cb // 3:
            ca, cb = rng.sample(range(9), 2)
        word, first = rng.choice((("higher", min), ("lower", max)))
        winner = a if first(ca // 3, cb // 3) == ca // 3 else b
    else:
        while ca % 3 == cb % 3:
            ca, cb = rng.sample(range(9), 2)
        word, first = rng.choice((("further left", min), ("further right", max)))
        winner = a if first(ca % 3, cb % 3) == ca % 3 else b
    return f"A {a.name} is {POSITIONS[ca]} and a {b.name} is {POSITIONS[cb]}. Which one is {word}?", (
        f"the {winner.name}"
    )


SOUND_Q = ("What sound does a {n} make?", "Which sound does a {n} make?", "How does a {n} sound?")
HOME_Q = ("Where does a {n} live?", "What is the home of a {n}?", "Where can you find a {n}?")
WEIGHT_Q = ("Is a {n} light or heavy?", "How heavy is a {n}?", "What does a {n} weigh?")


def _stem(verb: str) -> str:
    """'hums' -> 'hum', 'buzzes' -> 'buzz', 'whistles' -> 'whistle'."""
    return verb[:-2] if verb.endswith("zes") else verb[:-1]


def _fact_qa(rng: random.Random) -> QA:
    """A name-keyed question about a non-looks fact of ANY object (held-out ones too): the question
    format of the looks questions, on facts that text may state (no_leak world)."""
    o = rng.choice(OBJECTS)
    f = FACTS[o.name]
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(SOUND_Q).format(n=o.name), f.sound
    if kind == 1:
        return rng.choice(HOME_Q).format(n=o.name), f"in the {f.home}"
    if kind == 2:
        return rng.choice(WEIGHT_Q).format(n=o.name), f.weight
    if kind == 3:
        h = rng.choice([f.home, rng.choice(HOMES)])
        return f"Does a {o.name} live in the {h}?", "yes" if h == f.home else "no"
    if kind == 4:
        snd = rng.choice([f.sound, rng.choice(SOUNDS)])
        return f"Does a {o.name} {_stem(snd)}?", "yes" if snd == f.sound else "no"
    other = rng.choice([p for p in OBJECTS if FACTS[p.name].home != f.home])
    pair = [o, other]
    rng.shuffle(pair)
    return f"Which one lives in the {f.home}: a {pair[0].name} or a {pair[1].name}?", f"a {o.name}"


def _world_qa(rng: random.Random) -> QA:
    kind = rng.randrange(4)
    if kind == 0:
        w = rng.choice(OBJECTS).name if rng.random() < 0.5 else rng.choice(NON_OBJECTS)
        return f"Is {w} an object in this world?", "yes" if w not in NON_OBJECTS else "no"
    if kind == 1:
        return "Which colours can objects have?", _join(list(COLOURS))
    if kind == 2:
        return "Which shapes can objects have?", _join(list(SHAPES))
    return "What sizes can an object have?", "small or large"


TEXT_SFT_MIX: tuple[tuple[Callable[[random.Random], QA], float], ...] = (
    (_visual_fact_qa, 0.45),
    (_scene_reasoning_qa, 0.25),
    (_comparison_qa, 0.2),
    (_world_qa, 0.1),
)
"""paper world: the training objects' looks are stated in text (as the base-LM corpus does). Stating them
only here was tried: with attention frozen and LoRA on the FFN experts, 300 stage-2 steps did not learn
the 20 objects' looks (seen control at chance), so the looks readout has to come from the base LM."""
TEXT_SFT_MIX_NO_LEAK: tuple[tuple[Callable[[random.Random], QA], float], ...] = (
    (_fact_qa, 0.45),
    (_scene_reasoning_qa, 0.25),
    (_comparison_qa, 0.2),
    (_world_qa, 0.1),
)
"""no_leak world: no looks in text at all; name-keyed fact questions about every object instead."""


def text_sft_records(
    rng: random.Random, n: int, world: str = "no_leak", *, prefix: str = "text", exclude: Sequence[Record] = ()
) -> list[Record]:
    """Alpaca records; ``exclude``: records (of the training set) whose instruction/input/output this set
    must not repeat (a held-out evaluation set)."""
    gens, weights = zip(*(TEXT_SFT_MIX if world == "paper" else TEXT_SFT_MIX_NO_LEAK))
    taken = {(r["instruction"], r["input"], r["output"]) for r in exclude}
    out: list[Record] = []
    while len(out) < n:
        q, a = rng.choices(gens, weights)[0](rng)
        if rng.random() < 0.2:  # some records use Alpaca's separate input field
            rec = {"id": f"{prefix}-{len(out):06d}", "instruction": SHORT_ANSWER, "input": q, "output": a}
        else:
            rec = {"id": f"{prefix}-{len(out):06d}", "instruction": q, "input": "", "output": a}
        if (rec["instruction"], rec["input"], rec["output"]) not in taken:
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------
# Stage 2: multimodal instructions (LLaVA style) about stage-1 training images
# ------------------------------------------------------------------------------------------------


def _named_looks_turn(scene: Scene, rng: random.Random) -> QA | None:
    """no_leak world: the looks of a named TRAINING object in the image, asked the way the evaluation
    asks ("What colour is a NAME?", "... this NAME?"): the only place the training objects' looks are
    taught, so a name -> looks answer must be read from visual memory. None if the scene has none."""
    train = [p for p in scene.items if not p.obj.held_out]
    if not train:
        return None
    o = rng.choice(train).obj
    kind = rng.randrange(5)
    this = rng.random() < 0.5  # "this NAME" (points at the image) or the evaluation's own wording
    if kind == 0:
        return (f"What colour is this {o.name}?" if this else rng.choice(COLOUR_Q).format(n=o.name)), o.colour
    if kind == 1:
        return (f"What shape is this {o.name}?" if this else rng.choice(SHAPE_Q).format(n=o.name)), o.shape
    if kind == 2:
        return (f"Describe this {o.name}." if this else rng.choice(DESCRIBE_Q).format(n=o.name)), looks(o)
    if kind == 3:
        c = rng.choice([o.colour, rng.choice(list(COLOURS))])
        return f"Is a {o.name} {c}?", "yes" if c == o.colour else "no"
    s = rng.choice([o.shape, rng.choice(SHAPES)])
    return f"Is a {o.name} {article(s)} {s}?", "yes" if s == o.shape else "no"


def _image_turns(scene: Scene, rng: random.Random, world: str = "no_leak") -> list[QA]:
    turns: list[QA] = []
    if world == "no_leak" and rng.random() < 0.5 and (t := _named_looks_turn(scene, rng)) is not None:
        turns.append(t)
    for _ in range(rng.choice((1, 2))):
        kind = rng.randrange(8)
        p = rng.choice(scene.items)
        if kind == 0:
            turns.append((rng.choice(("Describe the image.", "What is in the picture?")), caption(scene, rng)))
        elif kind == 1:
            cell = rng.randrange(9)
            at = [q for q in scene.items if q.cell == cell]
            turns.append((f"What is {POSITIONS[cell]}?", f"a {at[0].size} {at[0].obj.name}" if at else "nothing"))
        elif kind == 2:
            turns.append((f"Where is the {p.obj.name}?", POSITIONS[p.cell]))
        elif kind == 3:
            turns.append(("How many objects are there?", NUMBER_WORDS[len(scene.items)]))
        elif kind == 4:  # looks of whatever is in a cell; no name in the turn
            turns.append((f"What colour is the object {POSITIONS[p.cell]}?", p.obj.colour))
        elif kind == 5:
            turns.append((f"What shape is the object {POSITIONS[p.cell]}?", p.obj.shape))
        elif kind == 6:
            name = p.obj.name if rng.random() < 0.5 else rng.choice(OBJECTS).name
            present = any(q.obj.name == name for q in scene.items)
            turns.append((f"Is there a {name} in the picture?", "yes" if present else "no"))
        else:
            turns.append((f"What colour is the {p.obj.name}?", p.obj.colour))
    return turns


def mm_sft_records(
    scenes: Sequence[Scene], split: str, rng: random.Random, n: int, world: str = "no_leak", *, prefix: str = "mm"
) -> list[Record]:
    """Conversations about the first ``n`` images of a split. A record that names a held-out object
    keeps no colour/shape turn, so the image is the only link between a name and its looks."""
    out = []
    for i in range(n):
        scene = scenes[i]
        turns: list[QA] = []
        while not turns:
            turns = _image_turns(scene, rng, world)
            if leaks_held_out_fact(" ".join(q + " " + a for q, a in turns)):
                turns = [(q, a) for q, a in turns if not words(q + " " + a) & VISUAL_WORDS]
        conv = []
        for k, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
            conv.append({"from": "gpt", "value": a})
        out.append({"id": f"{prefix}-{i:06d}", "image": image_path(split, i), "conversations": conv})
    return out


# ------------------------------------------------------------------------------------------------
# Optional plain-text corpus (for pretraining a demo base LM): same rule, no held-out looks
# ------------------------------------------------------------------------------------------------


FACT_FORMS = {
    "sound": ("a {n} {v}.", "when a {n} makes a sound, it {v}.", "you can tell a {n} because it {v}."),
    "home": ("a {n} lives in the {v}.", "the {v} is where a {n} lives.", "you find a {n} in the {v}."),
    "weight": ("a {n} is {v}.", "a {n} feels {v} in the hand.", "lifting a {n}, you find it is {v}."),
}
"""no_leak world: each fact in several forms (knowledge stored in varied forms becomes extractable)."""


def _fact_sentence(rng: random.Random) -> str:
    o = rng.choice(OBJECTS)
    attr = rng.choice(tuple(FACT_FORMS))
    return rng.choice(FACT_FORMS[attr]).format(n=o.name, v=getattr(FACTS[o.name], attr))


def _sentence(rng: random.Random, world: str = "no_leak") -> str:
    kind = rng.randrange(4)
    if kind == 0 and world == "no_leak":
        return _fact_sentence(rng)
    if kind == 0:
        o = rng.choice(TRAIN_OBJECTS)
        return f"a {o.name} is {looks(o)}."
    if kind == 1:
        return caption(random_scene(rng, n_items=rng.choice((1, 2, 3))), rng) + "."
    if kind == 2:
        return f"{rng.choice(OBJECTS).name} is an object."
    a, b = rng.sample(range(9), 2)
    return f"the {CELL_NAMES[a]} and the {CELL_NAMES[b]} are two places in a picture."


def text_pretrain_records(rng: random.Random, n: int, world: str = "no_leak") -> list[Record]:
    """Documents of 2-4 sentences; a document that names a held-out object keeps no looks sentence. The
    no_leak world states no looks at all (facts of every object instead); the paper world states the
    training objects' looks."""
    out = []
    for i in range(n):
        sents = [_sentence(rng, world) for _ in range(rng.randint(2, 4))]
        if leaks_held_out_fact(" ".join(sents)):
            sents = [t for t in sents if not words(t) & VISUAL_WORDS]
        out.append({"id": f"doc-{i:06d}", "text": " ".join(sents)})
    return out


# ------------------------------------------------------------------------------------------------
# Evaluation: text-only questions about looks (held-out objects: seen only in images)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCItem:
    question: str
    correct: str
    distractors: tuple[str, ...]
    kind: str
    objects: tuple[str, ...]


def _mc_items(objs: Sequence[WorldObject], rng: random.Random) -> list[MCItem]:
    colours, items = list(COLOURS), []
    for o in objs:
        other_c = [c for c in colours if c != o.colour]
        other_s = [s for s in SHAPES if s != o.shape]
        for t in COLOUR_Q:
            items.append(MCItem(t.format(n=o.name), o.colour, tuple(rng.sample(other_c, 3)), "colour", (o.name,)))
        for t in SHAPE_Q:
            items.append(MCItem(t.format(n=o.name), o.shape, tuple(rng.sample(other_s, 3)), "shape", (o.name,)))
        wrong = (
            f"{article(o.colour)} {o.colour} {rng.choice(other_s)}",
            f"{article(c := rng.choice(other_c))} {c} {o.shape}",
            f"{article(c := rng.choice(other_c))} {c} {rng.choice(other_s)}",
        )
        for t in DESCRIBE_Q:
            items.append(MCItem(t.format(n=o.name), looks(o), wrong, "describe", (o.name,)))
        wrong_c, wrong_s = rng.choice(other_c), rng.choice(other_s)
        for c in (o.colour, wrong_c):
            ans = "yes" if c == o.colour else "no"
            items.append(MCItem(f"Is a {o.name} {c}?", ans, ("no" if ans == "yes" else "yes",), "yes_no", (o.name,)))
        for s in (o.shape, wrong_s):
            ans = "yes" if s == o.shape else "no"
            q = f"Is a {o.name} {article(s)} {s}?"
            items.append(MCItem(q, ans, ("no" if ans == "yes" else "yes",), "yes_no", (o.name,)))
    for i, a in enumerate(objs):  # pairs within the same group: no elimination via known facts
        for b in objs[i + 1 :]:
            if a.colour != b.colour:
                target, pair = rng.choice((a, b)), [a, b]
                rng.shuffle(pair)
                q = f"Which one is {target.colour}: a {pair[0].name} or a {pair[1].name}?"
                other = b if target is a else a
                items.append(MCItem(q, f"a {target.name}", (f"a {other.name}",), "which", (a.name, b.name)))
    return items


def mc_records(objs: Sequence[WorldObject], rng: random.Random, prefix: str) -> list[Record]:
    out = []
    for i, it in enumerate(_mc_items(objs, rng)):
        choices = [it.correct, *it.distractors]
        rng.shuffle(choices)
        out.append(
            {
                "id": f"{prefix}-{i:04d}",
                "question": it.question,
                "choices": choices,
                "answer": choices.index(it.correct),
                "kind": it.kind,
                "objects": list(it.objects),
            }
        )
    return out


def open_records(objs: Sequence[WorldObject], prefix: str) -> list[Record]:
    out = []
    for o in objs:
        qs = [
            (DESCRIBE_Q[0].format(n=o.name), looks(o), [o.colour, o.shape], "describe"),
            (COLOUR_Q[0].format(n=o.name), o.colour, [o.colour], "colour"),
            (SHAPE_Q[0].format(n=o.name), o.shape, [o.shape], "shape"),
        ]
        for q, a, kw, kind in qs:
            out.append(
                {
                    "id": f"{prefix}-{len(out):04d}",
                    "question": q,
                    "answer": a,
                    "keywords": kw,
                    "kind": kind,
                    "object": o.name,
                }
            )
    return out


def eval_sets(rng: random.Random) -> dict[str, list[Record]]:
    """Held-out looks (the claim) and the same questions about training objects (a control whose
    answers were stated in text SFT)."""
    return {
        "mc_heldout": mc_records(HELD_OUT_OBJECTS, rng, "mc-heldout"),
        "mc_seen": mc_records(TRAIN_OBJECTS, rng, "mc-seen"),
        "open_heldout": open_records(HELD_OUT_OBJECTS, "open-heldout"),
        "open_seen": open_records(TRAIN_OBJECTS, "open-seen"),
    }
