"""Record kinds: how one input record becomes pieces (see ``mks2.data.chat``) and an optional image.

Kinds and their default field names (``fields`` overrides any of them):

- ``caption``: ``image`` (path) and ``caption``. Tokens ``<s> <image> caption </s>``; loss on the
  caption and its EOS (image-to-text generation, stage 1).
- ``text``: ``text``. Tokens ``<s> text </s>``; loss on everything after BOS.
- ``alpaca``: ``instruction``, ``input`` (optional) and ``output``: one chat turn whose user message
  is the instruction, a blank line and the input (when not empty); loss on the output.
- ``llava``: ``image`` (optional) and ``conversations``, a list of ``{from, value}`` turns (names set by
  ``role``/``content``) alternating ``human`` and ``gpt`` (``user``/``assistant`` roles), optionally
  opened by a ``system`` turn. One ``<image>`` placeholder in a human turn marks where the image goes
  (LLaVA's convention); when the record has an image but no placeholder, ``<image>\\n`` is put before
  the first human message, as LLaVA does. Loss on the gpt answers.

A bad record raises ``RecordProblem`` with the reason; the caller adds the file and line.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mks2.data.chat import BOS, IMAGE, Piece, chat_pieces
from mks2.data.records import RecordProblem

KINDS = ("caption", "llava", "alpaca", "text")

DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "caption": {"image": "image", "caption": "caption"},
    "text": {"text": "text"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "llava": {
        "image": "image",
        "conversations": "conversations",
        "role": "from",
        "content": "value",
        "user": "human",
        "assistant": "gpt",
        "system": "system",
    },
}

KIND_HAS_IMAGE = {"caption": True, "llava": True, "alpaca": False, "text": False}


def resolve_fields(kind: str, overrides: dict[str, str] | None) -> dict[str, str]:
    """Default field names of ``kind`` with ``overrides`` applied; unknown names raise ValueError."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r} (allowed: {', '.join(KINDS)})")
    fields = dict(DEFAULT_FIELDS[kind])
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"unknown field {key!r} for kind {kind} (allowed: {', '.join(fields)})")
        if not isinstance(value, str) or not value:
            raise ValueError(f"field {key!r}: expected a non-empty column name, got {value!r}")
        fields[key] = value
    return fields


def _check_utf8(value: str, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: invalid UTF-8 bytes in CSV or \ud800 in JSON
        raise RecordProblem(f"invalid UTF-8 in field {name!r} (character {exc.start})") from None


def get_str(rec: dict[str, Any], name: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    value = rec.get(name)
    if value is None:
        if required:
            raise RecordProblem(f"missing field {name!r} (record has: {', '.join(map(str, rec)) or 'no fields'})")
        return None
    if not isinstance(value, str):
        raise RecordProblem(f"field {name!r} must be a string, got {type(value).__name__}")
    _check_utf8(value, name)
    if not allow_empty and required and not value.strip():
        raise RecordProblem(f"field {name!r} is empty")
    return value


def parse_payload(payload: Any) -> dict[str, Any]:
    """A record as a dict: JSONL bytes are decoded and parsed here (in the worker)."""
    if isinstance(payload, RecordProblem):
        raise payload
    if isinstance(payload, (bytes, bytearray)):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordProblem(f"invalid UTF-8 at byte {exc.start}") from None
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordProblem(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(payload, dict):
        raise RecordProblem(f"expected a JSON object, got {type(payload).__name__}")
    return payload


def normalize_image_path(path: str, image_root: str | None) -> str:
    """Store image paths relative to the image root (absolute paths inside it are made relative)."""
    if image_root and os.path.isabs(path):
        rel = os.path.relpath(path, image_root)
        if not rel.startswith(".."):
            return rel
    return path


def _conversation(rec: dict[str, Any], f: dict[str, str]) -> list[Any]:
    conv = rec.get(f["conversations"])
    if conv is None:
        raise RecordProblem(f"missing field {f['conversations']!r}")
    if isinstance(conv, str):  # CSV cells and some exports keep the list as a JSON string
        try:
            conv = json.loads(conv)
        except json.JSONDecodeError as exc:
            raise RecordProblem(f"field {f['conversations']!r} is not a JSON list ({exc.msg})") from None
    if not isinstance(conv, list) or not conv:
        raise RecordProblem(f"field {f['conversations']!r} must be a non-empty list of turns")
    return conv


def llava_turns(
    rec: dict[str, Any], f: dict[str, str], *, has_image: bool, image_token: str
) -> tuple[list[tuple[str, str]], str | None]:
    """(user, answer) pairs and the system prompt (None if absent) of a LLaVA record."""
    conv = _conversation(rec, f)
    system = None
    texts: list[tuple[str, str]] = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RecordProblem(f"turn {i} is not an object")
        role = turn.get(f["role"])
        content = get_str(turn, f["content"], allow_empty=True)
        if i == 0 and role == f["system"]:
            system = content
            continue
        texts.append((str(role), content))  # type: ignore[arg-type]
    if len(texts) % 2:
        raise RecordProblem(f"conversation has {len(texts)} turns; expected {f['user']}/{f['assistant']} pairs")
    turns: list[tuple[str, str]] = []
    for j in range(0, len(texts), 2):
        (r_user, user), (r_bot, answer) = texts[j], texts[j + 1]
        if r_user != f["user"] or r_bot != f["assistant"]:
            raise RecordProblem(
                f"turns {j}-{j + 1} have roles {r_user!r}, {r_bot!r}; expected {f['user']!r} then {f['assistant']!r}"
            )
        if image_token in answer:
            raise RecordProblem(f"the {f['assistant']!r} turn {j + 1} contains the image placeholder {image_token!r}")
        if not answer.strip():
            raise RecordProblem(f"the {f['assistant']!r} turn {j + 1} is empty")
        turns.append((user, answer))
    count = sum(u.count(image_token) for u, _ in turns)
    if has_image:
        if count == 0:
            turns[0] = (f"{image_token}\n{turns[0][0]}", turns[0][1])
        elif count > 1:
            raise RecordProblem(f"{count} image placeholders {image_token!r}; one image per record is supported")
    elif count:
        raise RecordProblem(f"image placeholder {image_token!r} in the text but no {f['image']!r} field")
    return turns, system


def record_pieces(
    kind: str,
    rec: dict[str, Any],
    fields: dict[str, str],
    *,
    template: str,
    system_prompt: str | None,
    image_token: str,
) -> tuple[list[Piece], str | None]:
    """(pieces, image path or None) of one record, or RecordProblem."""
    if kind == "caption":
        image = get_str(rec, fields["image"])
        caption = get_str(rec, fields["caption"])
        return [BOS, IMAGE, Piece("text", caption.strip(), True), Piece("eos", loss=True)], image  # type: ignore[union-attr]
    if kind == "text":
        text = get_str(rec, fields["text"])
        return [BOS, Piece("text", text, True), Piece("eos", loss=True)], None  # type: ignore[arg-type]
    if kind == "alpaca":
        instruction = get_str(rec, fields["instruction"])
        extra = get_str(rec, fields["input"], required=False)
        output = get_str(rec, fields["output"])
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = [(user, output)]
        return chat_pieces(turns, template=template, system=system_prompt, image_token=None), None  # type: ignore[list-item]
    if kind == "llava":
        image = get_str(rec, fields["image"], required=False)
        image = image if image and image.strip() else None
        turns, system = llava_turns(rec, fields, has_image=image is not None, image_token=image_token)
        system = system if system is not None else system_prompt
        return chat_pieces(turns, template=template, system=system, image_token=image_token), image
    raise ValueError(f"unknown record kind {kind!r}")
