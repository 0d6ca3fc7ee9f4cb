"""Our base model loaded from transformers-saved Llama checkpoints gives transformers' logits (fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from mks2.config import Stage
from tests.model.model_helpers import VOCAB, build, random_ids, tiny_llama

ATOL = 1e-5

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}  # fmt: skip


def save_bin(hf, directory, *, shards: int = 1) -> None:
    """Write an HF checkpoint as pytorch_model.bin (or N shards + pytorch_model.bin.index.json), the
    layout of older Llama-2 releases; transformers 5 only writes safetensors itself."""
    hf.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("rope", list(ROPES))
def test_base_matches_transformers_llama(tmp_path, rope):
    kw = {} if ROPES[rope] is None else {"rope_scaling": ROPES[rope]}
    hf = tiny_llama(tmp_path, **kw)
    model = build(tmp_path, "model.stage=base")
    assert model.config.num_kv_heads == 2 and model.config.num_heads == 4  # GQA read from config.json
    assert (model.config.rope_scaling or {}).get("rope_type") == (ROPES[rope] or {}).get("rope_type")
    seq = 160 if rope == "dynamic" else 48  # dynamic: beyond max_position_embeddings (128) so it matters
    ids = random_ids(2, seq)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.logits.shape == (2, seq, VOCAB)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin", "bin_sharded"])
def test_checkpoint_layouts_load_identically(tmp_path, layout):
    src = tmp_path / "ckpt"
    src.mkdir()
    hf = tiny_llama(tmp_path / "tmp")
    if layout == "safetensors_sharded":
        hf.save_pretrained(src, max_shard_size="20KB")
        assert len(list(src.glob("model-*.safetensors"))) > 2 and (src / "model.safetensors.index.json").exists()
    else:
        save_bin(hf, src, shards=3 if layout == "bin_sharded" else 1)
    assert not (src / "model.safetensors").exists()
    model = build(src, "model.stage=base")
    ids = random_ids(2, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_tied_embeddings(tmp_path):
    hf = tiny_llama(tmp_path, tie_word_embeddings=True)
    model = build(tmp_path, "model.stage=base")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(1, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_eager_backend_matches_sdpa_and_hf(tmp_path):
    hf = tiny_llama(tmp_path)
    eager = build(tmp_path, "model.stage=base", "model.attention=eager")
    ids = random_ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_bf16_model_close_to_transformers_bf16(tmp_path):
    hf = tiny_llama(tmp_path).to(torch.bfloat16)
    model = build(tmp_path, "model.stage=base", "model.dtype=bf16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.stage == Stage.BASE
    ids = random_ids(2, 24)
    with torch.no_grad():
        ours, ref = model(ids).logits.float(), hf(ids).logits.float()
    # Same op order as HF (norm cast before scale, cos/sin in the activation dtype): bf16 rounding only.
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
