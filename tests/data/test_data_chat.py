"""Chat templates: exact Llama-2 / Vicuna v1 layout, loss mask on answers (and their EOS) only."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from mks2.data.chat import VICUNA_SYSTEM, Piece, chat_pieces, prompt_pieces
from mks2.data.encode import encode_pieces
from mks2.data.tokenizer import load_tokenizer

TURNS = [("what shape is red?", "the circle"), ("and blue?", "a square")]


def _render(pieces):
    out = []
    for p in pieces:
        out.append({"bos": "<s>", "eos": "</s>", "image": "<image>"}.get(p.kind, p.text))
    return "".join(out)


def test_llama2_layout():
    pieces = chat_pieces(TURNS, template="llama2", system="be brief")
    assert _render(pieces) == (
        "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nwhat shape is red? [/INST]the circle</s>"
        "<s>[INST] and blue? [/INST]a square</s>"
    )
    assert [p.text for p in pieces if p.loss and p.kind == "text"] == ["the circle", "a square"]


def test_vicuna_layout_with_default_system():
    pieces = chat_pieces(TURNS, template="vicuna_v1")
    assert _render(pieces) == (
        f"<s>{VICUNA_SYSTEM} USER: what shape is red? ASSISTANT:the circle</s>USER: and blue? ASSISTANT:a square</s>"
    )


def test_generation_prompt_ends_open():
    pieces = prompt_pieces(TURNS[:1], "and blue?", template="llama2")
    assert pieces[-1] == Piece("text", "[INST] and blue? [/INST]")
    assert not any(p.loss for p in pieces[-2:])


@pytest.mark.parametrize("template", ["llama2", "vicuna_v1"])
def test_loss_mask_covers_answers_only(sp_model, template):
    tok = load_tokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids, mask = encode_pieces(tok, chat_pieces(TURNS, template=template), image_token_id=-200)
    assert ids.dtype == np.int32 and mask.dtype == np.int8 and len(ids) == len(mask)
    # the masked tokens are exactly: answer 1, EOS, answer 2, EOS
    expected = ref.encode("the circle") + [2] + ref.encode("a square") + [2]
    assert ids[mask == 1].tolist() == expected
    assert ids[0] == 1 and mask[0] == 0  # BOS, never a target
    assert (ids == 2).sum() == 2 and mask[ids == 2].all()  # each answer closed by a target EOS


def test_image_placeholder_is_one_id(sp_model):
    tok = load_tokenizer(sp_model)
    ids, mask = encode_pieces(tok, chat_pieces([("<image>\ndescribe", "red circle")], template="llama2"))
    assert (ids == -200).sum() == 1 and mask[ids == -200].tolist() == [0]
    assert chat_pieces([("<image> x", "y")], template="llama2", image_token=None)[1].text.startswith("[INST] <image>")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template"):
        chat_pieces(TURNS, template="chatml")
