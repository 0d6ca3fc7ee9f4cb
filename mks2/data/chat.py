"""Chat templates (Llama-2 chat, Vicuna v1) as *pieces*: text spans with a loss flag plus BOS, EOS and
image placeholders. Tokenising piece by piece (instead of the whole rendered string) gives the loss mask
exactly: it covers the answer tokens and the EOS that closes each answer, nothing of the prompt.

The same pieces serve training data (``pretokenize``) and generation prompts (``prompt_pieces`` with the
last answer left open), so a model is prompted exactly as it was trained.

Llama-2 chat (Meta's reference ``chat_completion``)::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...

Vicuna v1 (FastChat ``vicuna_v1``)::

    <s>{system} USER: {user} ASSISTANT: {answer}</s>USER: {user} ASSISTANT: ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TEMPLATES = ("llama2", "vicuna_v1")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Piece:
    """One span of a record. ``kind``: ``text`` (``text`` holds it), ``bos``, ``eos`` or ``image`` (the
    single placeholder id). ``loss``: whether these tokens are prediction targets."""

    kind: str
    text: str = ""
    loss: bool = False


BOS = Piece("bos")
IMAGE = Piece("image")


def split_image(text: str, image_token: str | None, *, loss: bool = False) -> list[Piece]:
    """Text pieces around each ``image_token``, with an image piece in its place (None: no images)."""
    if image_token is None:
        return [Piece("text", text, loss)] if text else []
    out: list[Piece] = []
    parts = text.split(image_token)
    for i, part in enumerate(parts):
        if i:
            out.append(IMAGE)
        if part:
            out.append(Piece("text", part, loss))
    return out


def chat_pieces(
    turns: Sequence[tuple[str, str | None]],
    *,
    template: str,
    system: str | None = None,
    image_token: str | None = "<image>",
) -> list[Piece]:
    """Pieces of a conversation of (user, answer) turns. A final answer of ``None`` leaves the
    conversation open after the last prompt (a generation prompt). User text may hold ``image_token``
    (None: text-only, the placeholder string stays plain text)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (allowed: {', '.join(TEMPLATES)})")
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    pieces: list[Piece] = []
    if template == "llama2":
        for i, (user, answer) in enumerate(turns):
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if (i == 0 and system) else ""
            pieces.append(BOS)
            pieces += split_image(f"[INST] {sys_block}{user.strip()} [/INST]", image_token)
            if answer is None:
                break
            pieces += [Piece("text", answer.strip(), True), Piece("eos", loss=True)]
    else:  # vicuna_v1
        sys_text = VICUNA_SYSTEM if system is None else system
        pieces.append(BOS)
        for i, (user, answer) in enumerate(turns):
            prefix = f"{sys_text} " if (i == 0 and sys_text) else ""
            pieces += split_image(f"{prefix}USER: {user} ASSISTANT:", image_token)
            if answer is None:
                break
            pieces += [Piece("text", answer, True), Piece("eos", loss=True)]
    return pieces


def prompt_pieces(
    turns: Sequence[tuple[str, str]],
    question: str,
    *,
    template: str,
    system: str | None = None,
    image_token: str | None = "<image>",
) -> list[Piece]:
    """Pieces of a generation prompt: the finished ``turns`` followed by ``question`` awaiting an answer."""
    return chat_pieces([*turns, (question, None)], template=template, system=system, image_token=image_token)
