"""The demo's no-leak rule, checked on every record of every text dataset at every build.

A record *leaks* when it names a held-out object together with a colour or shape word anywhere in its text
(any string field but ``id`` and ``image``, conversations included). Which datasets are "text" depends on
the world: in ``no_leak`` every dataset (stage-1 captions too), in ``paper`` everything but the stage-1
captions (which describe appearance by design) -- the base-LM corpus and all stage-2 data, held-out
instruction sets included. A leak fails the build before anything else is written (no images, no
``BUILD.json``), naming the dataset, the record and the words.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mks2.demo.world import HELD_OUT_OBJECTS, VISUAL_WORDS, words
from mks2.errors import UserError

STAGE1_CAPTION_SETS = frozenset({"captions", "captions_heldout", "captions_noimage"})
"""Datasets that are stage-1 captions (allowed to describe appearance in the paper world only)."""


class DemoLeakError(UserError):
    """A generated text record states (or may state) a held-out object's looks: a generator bug."""


def _strings(value: Any, key: str = "") -> Iterator[str]:
    if isinstance(value, str):
        if key not in ("id", "image"):
            yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)


def record_leak(record: Mapping[str, Any]) -> tuple[set[str], set[str]] | None:
    """(held-out names, visual words) a record holds together, or None if it holds no such pair."""
    w = words(" ".join(_strings(record)))
    names, visual = w & {o.name for o in HELD_OUT_OBJECTS}, w & VISUAL_WORDS
    return (names, visual) if names and visual else None


def checked_datasets(names: Sequence[str], world: str) -> list[str]:
    """Which of ``names`` the rule covers in ``world``."""
    return [n for n in names if world != "paper" or n not in STAGE1_CAPTION_SETS]


def check_no_leak(datasets: Mapping[str, Sequence[Mapping[str, Any]]], world: str) -> int:
    """Raise DemoLeakError at the first leaking record of a covered dataset; returns the records checked."""
    checked = 0
    for name in checked_datasets(list(datasets), world):
        for i, rec in enumerate(datasets[name]):
            leak = record_leak(rec)
            if leak is not None:
                raise DemoLeakError(
                    f"demo world {world!r}: dataset {name!r} record {i} (id {rec.get('id')!r}) names held-out "
                    f"object(s) {', '.join(sorted(leak[0]))} together with {', '.join(sorted(leak[1]))}: the no-leak "
                    "rule says no text may link a held-out name to a colour or shape word"
                )
            checked += 1
    return checked
