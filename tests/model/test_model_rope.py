"""Our rotary frequencies against transformers' own rope functions, for every supported rope_type."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from mks2.model.rope import RotaryEmbedding, normalize_rope_scaling, rope_inv_freq

HEAD_DIM, MAX_POS, THETA = 16, 64, 10000.0

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.0},  # legacy key of transformers 4 configs
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2},
]  # fmt: skip


def hf_config(scaling):
    kw = dict(hidden_size=HEAD_DIM * 2, num_attention_heads=2, max_position_embeddings=MAX_POS, rope_theta=THETA)
    if scaling is not None:
        kw["rope_scaling"] = dict(scaling)
    return LlamaConfig(**kw)


def hf_inv_freq(scaling, seq_len=None):
    cfg = hf_config(scaling)
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        return 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM)), 1.0
    return ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=seq_len)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: "default" if s is None else str(s.get("rope_type", s)))
def test_inv_freq_matches_transformers(scaling):
    ours, scale = rope_inv_freq(head_dim=HEAD_DIM, theta=THETA, rope_scaling=scaling, max_position_embeddings=MAX_POS)
    ref, ref_scale = hf_inv_freq(scaling)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale)
    if scaling is not None:
        plain, _ = rope_inv_freq(head_dim=HEAD_DIM, theta=THETA, rope_scaling=None, max_position_embeddings=MAX_POS)
        assert not torch.allclose(ours, plain), "scaling must change the frequencies"


@pytest.mark.parametrize("seq_len", [32, 64, 200])
def test_dynamic_ntk_follows_sequence_length(seq_len):
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    rot = RotaryEmbedding(head_dim=HEAD_DIM, theta=THETA, rope_scaling=scaling, max_position_embeddings=MAX_POS)
    pos = torch.arange(seq_len)[None]
    ref, _ = hf_inv_freq(scaling, seq_len=torch.tensor(seq_len))
    torch.testing.assert_close(rot.inv_freq(pos), ref.float(), rtol=1e-6, atol=0)
    plain = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    # Within the trained length dynamic NTK is plain RoPE; beyond it the base grows.
    assert torch.allclose(rot.inv_freq(pos), plain) == (seq_len <= MAX_POS)


def test_cos_sin_tables_and_attention_scaling():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    rot = RotaryEmbedding(head_dim=HEAD_DIM, theta=THETA, rope_scaling=scaling, max_position_embeddings=MAX_POS)
    pos = torch.tensor([[0, 1, 5, 9]])
    cos, sin = rot(pos, torch.float32)
    assert cos.shape == (1, 4, HEAD_DIM)
    inv, attn = hf_inv_freq(scaling)
    ang = pos[..., None].float() * inv
    torch.testing.assert_close(cos, torch.cat([ang, ang], -1).cos() * attn)
    torch.testing.assert_close(sin, torch.cat([ang, ang], -1).sin() * attn)


def test_frequencies_survive_module_dtype_casts():
    rot = RotaryEmbedding(head_dim=HEAD_DIM, theta=THETA, max_position_embeddings=MAX_POS)
    before = rot.inv_freq(torch.zeros(1, 1, dtype=torch.long)).clone()
    rot.to(torch.bfloat16)  # DeepSpeed casts whole modules; frequencies must stay fp32
    after = rot.inv_freq(torch.zeros(1, 1, dtype=torch.long))
    assert after.dtype == torch.float32 and torch.equal(before, after)
    assert len(rot.state_dict()) == 0


def test_unsupported_or_incomplete_scaling_is_rejected():
    with pytest.raises(ValueError, match="unsupported rope_type 'longrope'"):
        normalize_rope_scaling({"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3.*needs low_freq_factor, high_freq_factor"):
        normalize_rope_scaling({"rope_type": "llama3", "factor": 8.0})
    assert normalize_rope_scaling({"rope_type": "default", "rope_theta": 10000.0}) is None
