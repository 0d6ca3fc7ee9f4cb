"""Evaluation files (JSONL, one object per line) and their prompts.

- multiple choice (PIQA / OpenBookQA / Social-IQA style): ``{"question": str, "choices": [str, ...],
  "answer": int}`` (index into ``choices``; ``label`` is accepted for ``answer``), optional ``kind`` (a
  breakdown key) and ``id``;
- open questions: ``{"question": str, "answer": str}``, optional ``keywords`` (all must appear in the
  generated answer for a keyword hit; default: the answer's words), ``kind``, ``id``;
- retrieval galleries (stage 1): ``{"image": path relative to the image root, "caption": str}``.

Prompts are built with the chat template the model was trained with (``mks2.data.chat``): the question as
the user turn, the choice as the answer tokenized on its own and closed by EOS, exactly like the loss mask
of the instruction datasets. ``chat_template=None`` scores plain ``BOS question`` + `` choice``
continuations (base models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mks2.data.chat import BOS, Piece, prompt_pieces
from mks2.data.encode import encode_pieces
from mks2.errors import UserError


class EvalDataError(UserError, ValueError):
    """An evaluation file is malformed; the message names the file and line."""


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int
    kind: str = "all"
    id: str = ""


@dataclass
class OpenItem:
    question: str
    answer: str
    keywords: list[str] = field(default_factory=list)
    kind: str = "all"
    id: str = ""


def _records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalDataError(f"evaluation file not found: {p}")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalDataError(f"{p}:{n}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise EvalDataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append((n, rec))
    if not out:
        raise EvalDataError(f"{p}: no records")
    return out


def _text(rec: dict[str, Any], key: str, where: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def read_mc(path: str | Path) -> list[MCItem]:
    items = []
    for n, rec in _records(path):
        where = f"{path}:{n}"
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise EvalDataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
        answer = rec.get("answer", rec.get("label"))
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalDataError(f"{where}: 'answer' must be an index into the {len(choices)} choices, got {answer!r}")
        items.append(
            MCItem(
                question=_text(rec, "question", where),
                choices=list(choices),
                answer=answer,
                kind=str(rec.get("kind", "all")),
                id=str(rec.get("id", n)),
            )
        )
    return items


def read_open(path: str | Path) -> list[OpenItem]:
    items = []
    for n, rec in _records(path):
        where = f"{path}:{n}"
        answer = _text(rec, "answer", where)
        keywords = rec.get("keywords", answer.lower().split())
        if not isinstance(keywords, list) or not all(isinstance(k, str) and k for k in keywords):
            raise EvalDataError(f"{where}: 'keywords' must be a list of strings, got {keywords!r}")
        items.append(
            OpenItem(
                question=_text(rec, "question", where),
                answer=answer,
                keywords=[k.lower() for k in keywords],
                kind=str(rec.get("kind", "all")),
                id=str(rec.get("id", n)),
            )
        )
    return items


def read_gallery(path: str | Path) -> list[tuple[str, str]]:
    """(image path, caption) pairs of a retrieval gallery."""
    out = []
    for n, rec in _records(path):
        where = f"{path}:{n}"
        out.append((_text(rec, "image", where), _text(rec, "caption", where)))
    return out


def prompt_ids(tokenizer: Any, question: str, chat_template: str | None) -> list[int]:
    """Token ids of the prompt that precedes an answer (BOS included)."""
    if chat_template is None:
        pieces = [BOS, Piece("text", question.strip())]
    else:
        pieces = prompt_pieces([], question, template=chat_template, image_token=None)
    ids, _ = encode_pieces(tokenizer, pieces)
    return [int(i) for i in ids]


def answer_ids(tokenizer: Any, answer: str, *, eos: bool = True) -> list[int]:
    """Token ids of an answer as the instruction data tokenizes it: the text on its own (+ EOS)."""
    pieces = [Piece("text", answer.strip(), True)] + ([Piece("eos", loss=True)] if eos else [])
    ids, _ = encode_pieces(tokenizer, pieces)
    return [int(i) for i in ids]
