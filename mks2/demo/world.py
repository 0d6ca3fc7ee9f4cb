"""The demo world: made-up object names whose looks (colour + shape) exist only in pictures.

Thirty nonsense words ("zorp", "blick", ...) each name one fixed (colour, shape) pair of 6 colours x
5 shapes. Ten of them are *held-out objects*: no text anywhere in the demo corpus (captions, text or
multimodal instructions, plain text) puts a held-out name next to a colour or shape word. Their looks
can only be learned from stage-1 images, whose captions name the objects with their size and grid
position but never their colour or shape. The evaluation asks text-only questions about exactly
those looks ("What colour is a zorp?"), which is the MKS2 claim in miniature.

A scene is a 3 x 3 grid (one cell per ViT patch of the demo vision tower) holding 1-3 objects,
each small or large, in distinct cells.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 200, 30),
    "purple": (145, 60, 185),
    "orange": (245, 130, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Grid cells in row-major order (cell index = 3 * row + col), with the phrase captions use.
POSITIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
# Cell names as a noun ("the top left"), used in questions.
CELL_NAMES: tuple[str, ...] = tuple(p.split(" ", 2)[2] for p in POSITIONS)
NAMES: tuple[str, ...] = (
    "zorp", "blick", "dax", "wug", "fep", "toma", "kiki", "bouba", "glorp", "snib",
    "plim", "vasp", "trell", "quib", "mork", "nolt", "yafe", "druz", "skeel", "flon",
    "grib", "hupa", "jenk", "lorb", "mizz", "pell", "rask", "sorn", "teb", "vump",
)  # fmt: skip
# Words that are NOT objects of the world (negative answers to "is X an object?").
NON_OBJECTS: tuple[str, ...] = ("flimp", "crod", "banu", "steg", "wobe", "yilt", "nusk", "parf")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
WORLD_SEED = 20231127


@dataclass(frozen=True)
class WorldObject:
    name: str
    colour: str
    shape: str
    held_out: bool
    """True: colour/shape never stated in any text; only visible in images."""


@dataclass(frozen=True)
class Placed:
    """One object instance in a scene."""

    obj: WorldObject
    size: str  # "small" | "large"
    cell: int  # 0..8, row-major


@dataclass(frozen=True)
class Scene:
    items: tuple[Placed, ...]
    background: int
    """Grey level of the background."""
    jitter: tuple[tuple[int, int], ...]
    """Per-item (dx, dy) pixel offset of the object's centre inside its cell."""

    def content_key(self) -> tuple[tuple[str, str, int], ...]:
        """What a caption can say about the scene (objects, sizes, cells), order-independent."""
        return tuple(sorted((p.obj.name, p.size, p.cell) for p in self.items))


def _is_held_out(colour_index: int, shape_index: int) -> bool:
    # Two held-out colours per shape, rotating, so each held-out object's colour and shape also
    # belong to >= 3 training objects (the visual concepts are learnable from training objects).
    return (colour_index - 2 * shape_index) % len(COLOURS) in (0, 1)


def build_objects(seed: int = WORLD_SEED) -> tuple[WorldObject, ...]:
    """The 30 objects: every (colour, shape) pair gets one name, assigned by a seeded shuffle."""
    combos = [(c, s) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    names = list(NAMES)
    random.Random(seed).shuffle(names)
    colours = list(COLOURS)
    objs = [
        WorldObject(name=n, colour=colours[c], shape=SHAPES[s], held_out=_is_held_out(c, s))
        for n, (c, s) in zip(names, combos)
    ]
    return tuple(sorted(objs, key=lambda o: o.name))


OBJECTS: tuple[WorldObject, ...] = build_objects()
BY_NAME: dict[str, WorldObject] = {o.name: o for o in OBJECTS}
TRAIN_OBJECTS: tuple[WorldObject, ...] = tuple(o for o in OBJECTS if not o.held_out)
HELD_OUT_OBJECTS: tuple[WorldObject, ...] = tuple(o for o in OBJECTS if o.held_out)
VISUAL_WORDS: frozenset[str] = frozenset(COLOURS) | frozenset(SHAPES)

WORLDS: tuple[str, ...] = ("no_leak", "paper")
"""The two demo worlds (``data.demo_world``). Same objects, images and evaluation questions; they differ in
where the looks are written:

- ``no_leak`` (default): no text anywhere names a held-out object with a colour or shape word; only images
  link a held-out name to its looks. Every object (held-out too) has non-looks facts (sound, home, weight)
  stated in several forms in the base-LM corpus and asked about in the text instructions; the training
  objects' looks are taught only by multimodal instructions (image + "What colour is this NAME?"); stage 1
  also retrieves single-object images from the name alone ("a zorp").
- ``paper``: stage-1 captions describe appearance, as real captions do ("a large red star zorp ...",
  "a large zorp ..., red and star-shaped"; half of the one-object scenes are captioned by the name alone,
  "a zorp", as short alt text is); no base-LM or stage-2 text states a held-out object's looks (the
  training objects' looks are stated in the base-LM corpus and the text instructions)."""


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe_item(p: Placed) -> str:
    """'a large zorp at the top left' -- name, size and position; never colour or shape."""
    return f"a {p.size} {p.obj.name} {POSITIONS[p.cell]}"


CAPTION_PREFIXES = ("", "a picture of ", "an image of ", "there is ")


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming every object with size and position, objects in a random order."""
    parts = [describe_item(p) for p in scene.items]
    rng.shuffle(parts)
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice(CAPTION_PREFIXES) + body


def describe_item_looks(p: Placed, rng: random.Random) -> str:
    """The ``paper`` world's caption item: name, size, position AND looks, in one of two word orders
    (looks before the name: 'a large red star zorp at the top left'; after it: 'a large zorp at the top
    left, red and star-shaped'), as real captions describe appearance."""
    o = p.obj
    if rng.random() < 0.5:
        return f"a {p.size} {o.colour} {o.shape} {o.name} {POSITIONS[p.cell]}"
    return f"a {p.size} {o.name} {POSITIONS[p.cell]}, {o.colour} and {o.shape}-shaped"


def caption_with_looks(scene: Scene, rng: random.Random) -> str:
    """A ``paper``-world caption: every object with size, position, colour and shape."""
    parts = [describe_item_looks(p, rng) for p in scene.items]
    rng.shuffle(parts)
    body = parts[0] if len(parts) == 1 else "; ".join(parts[:-1]) + " and " + parts[-1]
    return rng.choice(CAPTION_PREFIXES) + body


def name_only_caption(scene: Scene, rng: random.Random) -> str:
    """'a zorp' / 'a large zorp' for a one-object scene: the ``no_leak`` world's stage-1 retrieval from the
    name alone, so the looks are written at the name's own tokens (not only at a long caption's EOS)."""
    (p,) = scene.items
    return rng.choice((f"a {p.obj.name}", f"a {p.size} {p.obj.name}"))


# ------------------------------------------------------------------------------------------------
# Non-looks facts (the no_leak world): every object, held-out ones included, has a sound, a home and a
# weight. None of these words is a colour or shape word, so stating them never leaks looks; they give the
# stage-2 data a name-keyed fact question about EVERY object, held-out ones too (extraction as a skill).
# ------------------------------------------------------------------------------------------------

SOUNDS: tuple[str, ...] = ("hums", "clicks", "whistles", "buzzes", "chirps", "squeaks")
HOMES: tuple[str, ...] = ("forest", "river", "desert", "cave", "hill", "marsh")
WEIGHTS: tuple[str, ...] = ("light", "heavy")
FACT_WORDS: frozenset[str] = frozenset(SOUNDS) | frozenset(HOMES) | frozenset(WEIGHTS)
assert not FACT_WORDS & (frozenset(COLOURS) | frozenset(SHAPES))


@dataclass(frozen=True)
class Facts:
    sound: str
    home: str
    weight: str


def build_facts(seed: int = WORLD_SEED) -> dict[str, Facts]:
    """name -> its facts, a seeded draw (independent of the looks)."""
    rng = random.Random(f"facts:{seed}")
    return {n: Facts(rng.choice(SOUNDS), rng.choice(HOMES), rng.choice(WEIGHTS)) for n in sorted(NAMES)}


FACTS: dict[str, Facts] = build_facts()


def random_scene(rng: random.Random, *, n_items: int, objects: tuple[WorldObject, ...] = OBJECTS) -> Scene:
    """A scene of ``n_items`` distinct objects in distinct cells."""
    cells = rng.sample(range(9), n_items)
    objs = rng.sample(objects, n_items)
    items = tuple(Placed(obj=o, size=rng.choice(SIZES), cell=c) for o, c in zip(objs, cells))
    jitter = tuple((rng.randint(-2, 2), rng.randint(-2, 2)) for _ in items)
    return Scene(items=items, background=rng.randint(225, 250), jitter=jitter)


_WORD = re.compile(r"[a-z]+")


def words(text: str) -> set[str]:
    """Lower-case word set of a text (for leak checks)."""
    return set(_WORD.findall(text.lower()))


def leaks_held_out_fact(text: str) -> bool:
    """True if a text names a held-out object AND a colour or shape word (a possible leak of its looks)."""
    w = words(text)
    return bool(w & {o.name for o in HELD_OUT_OBJECTS}) and bool(w & VISUAL_WORDS)
