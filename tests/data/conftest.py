from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data.data_helpers import train_sentencepiece


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A tiny Llama-style sentencepiece model file (trained in well under a second)."""
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory, sp_model) -> Path:
    """An HF tokenizer directory as Llama checkpoints ship it: tokenizer.model + tokenizer_config.json."""
    d = tmp_path_factory.mktemp("hf_tok")
    (d / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return d
