"""The demo world's sentencepiece tokenizer: BPE with Llama's special ids, trained deterministically.

``train_sentencepiece`` is the project's one recipe for a small Llama-style sentencepiece model (the
demo, the tests' tiny tokenizers and the pretokenization benchmark all call it). Single-threaded
training on a fixed, ordered sentence list is deterministic, so the ``.model`` bytes (and hence the
tokenizer fingerprint in shard manifests) are identical across builds. ``train_tokenizer`` writes the
demo's tokenizer directory, which also holds a ``tokenizer_config.json`` so that transformers'
``AutoTokenizer`` loads it as a ``LlamaTokenizer``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 1024
UNK, BOS, EOS, PAD = 0, 1, 2, 3
# Strings of the supported chat templates (Llama-2 chat, Vicuna v1), so they get compact pieces.
TEMPLATE_TEXT = (
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n{q} [/INST] {a}",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: {q} ASSISTANT: {a}",
)


def chat_lines(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Instruction pairs rendered in every supported chat template (tokenizer training text only)."""
    return [t.format(q=q, a=a) for q, a in pairs for t in TEMPLATE_TEXT]


def train_sentencepiece(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    pad_id: int = PAD,
    num_threads: int = 1,
    input_sentence_size: int = 0,
    max_sentence_length: int = 4096,
) -> bytes:
    """Train a Llama-style BPE sentencepiece model on ``sentences`` (in order); returns the model bytes.

    Llama's conventions: ids unk=0, bos=1, eos=2 (``pad_id=-1``: no pad piece, as Llama-2), byte fallback
    (no <unk> for unseen characters), digits split, text kept as written (identity normalisation, spaces
    not collapsed). Reproducible with ``num_threads=1`` (multi-threaded training is not) and
    ``input_sentence_size=0`` (every sentence, in order); ``input_sentence_size=N`` trains on a random
    sample of N sentences of a large corpus. Longer sentences than ``max_sentence_length`` bytes are skipped.
    """
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=(writer := _BytesWriter()),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,  # as Llama: no <unk> for unseen characters
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=UNK,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=pad_id,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        num_threads=num_threads,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        max_sentence_length=max_sentence_length,
        minloglevel=2,
    )
    return writer.data


def train_tokenizer(sentences: list[str], out_dir: Path) -> Path:
    """Train the demo's BPE model on ``sentences`` (in order) into ``out_dir``; returns the .model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "tokenizer.model"
    model.write_bytes(train_sentencepiece(sentences, vocab_size=VOCAB_SIZE))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return model


class _BytesWriter:
    """sentencepiece's ``model_writer`` protocol: collects the serialized model."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
