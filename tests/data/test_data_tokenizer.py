"""Tokenizer loading: sentencepiece files and HF directories give one interface and the same ids."""

from __future__ import annotations

import json
import pickle

import pytest
import sentencepiece as spm

from mks2.data.errors import DataError
from mks2.data.tokenizer import load_tokenizer, tokenizer_fingerprint

SAMPLES = [
    "the red circle is on the left",
    " leading space",
    "\nnewline first",
    "double  spaces   here",
    "digits 12345 and ünïcode 😀",
    "[INST] what color [/INST]",
    "literal </s> and <s> markers are text",
    "",
]


def test_sentencepiece_file_matches_sentencepiece(sp_model):
    tok = load_tokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.backend == "sentencepiece"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (ref.get_piece_size(), 1, 2, None)
    assert tok.encode_batch(SAMPLES) == [ref.encode(s) for s in SAMPLES]
    # special markers typed in text stay text: no BOS/EOS ids appear
    assert not {1, 2} & set(tok.encode("literal </s> and <s> markers"))
    assert tok.decode(tok.encode("the red circle")) == "the red circle"
    # the flat form pretokenize uses (int32 buffers where sentencepiece has them) gives the same ids
    # a build with the buffer encoder (pybind, e.g. 0.2.3) must be using it; others fall back to lists
    assert (tok._buffers is not None) == hasattr(getattr(ref, "_processor", None), "_EncodeAsBufferBatch")
    counts, ids = tok.encode_arrays(SAMPLES)
    assert counts.tolist() == [len(ref.encode(s)) for s in SAMPLES] and ids.dtype.name == "int32"
    assert ids.tolist() == [i for s in SAMPLES for i in ref.encode(s)]
    assert pickle.loads(pickle.dumps(tok)).encode_arrays(SAMPLES)[1].tolist() == ids.tolist()
    # framed: BOS ids EOS per text, counted without BOS/EOS (sentencepiece adds them itself)
    framed = [i for s in SAMPLES for i in [1, *ref.encode(s), 2]]
    assert [a.tolist() for a in tok.encode_framed(SAMPLES)] == [counts.tolist(), framed]
    chunks = [(0, 3), (3, 4), (4, len(SAMPLES))]  # one tokenizer call each, joined in order
    assert [a.tolist() for a in tok.encode_framed(SAMPLES, chunks)] == [counts.tolist(), framed]
    # counts read from the buffers when the ids hold another number of EOS ids than texts (a model
    # whose EOS id is an ordinary piece): here an id that the samples' text pieces contain
    common = ids[0].item()
    other = load_tokenizer(sp_model)
    other.eos_id = common
    got_counts, got = other.encode_framed(SAMPLES)
    assert got_counts.tolist() == counts.tolist() and got.tolist() == framed
    tok._buffers = None  # the list fallback (other sentencepiece builds, HF tokenizers) agrees
    assert [a.tolist() for a in tok.encode_arrays(SAMPLES)] == [counts.tolist(), ids.tolist()]
    assert [a.tolist() for a in tok.encode_framed(SAMPLES)] == [counts.tolist(), framed]
    assert [a.tolist() for a in tok.encode_framed(SAMPLES, chunks)] == [counts.tolist(), framed]


def test_hf_llama_directory_encodes_like_sentencepiece(sp_model, hf_llama_dir):
    """transformers 5's LlamaTokenizer differs from sentencepiece (leading spaces, '</s>' in text); a
    directory with tokenizer.model must encode exactly like the sentencepiece model."""
    tok = load_tokenizer(hf_llama_dir)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.encode_batch(SAMPLES) == [ref.encode(s) for s in SAMPLES]
    assert tok.fingerprint == load_tokenizer(sp_model).fingerprint == tokenizer_fingerprint(hf_llama_dir)


def test_hf_json_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.data.data_helpers import corpus_lines

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(corpus_lines(), trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.backend == "hf"
    assert (tok.bos_id, tok.eos_id) == (t.token_to_id("<s>"), t.token_to_id("</s>"))
    assert tok.encode("the red circle") == t.encode("the red circle").ids
    ids = tok.encode("a </s> b")
    assert tok.eos_id not in ids  # '</s>' in data is not an end-of-sequence marker
    assert tokenizer_fingerprint(tmp_path) == tok.fingerprint
    assert set(tok.files) == {"tokenizer.json", "tokenizer_config.json"}
    assert pickle.loads(pickle.dumps(tok)).encode("the red circle") == tok.encode("the red circle")


def test_fingerprint_changes_with_the_model(tmp_path, sp_model):
    from tests.data.data_helpers import train_sentencepiece

    other = train_sentencepiece(tmp_path / "other.model", vocab_size=420)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(sp_model)


def test_pickles_for_worker_processes(sp_model):
    tok = load_tokenizer(sp_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable sentencepiece model"):
        load_tokenizer(junk)
