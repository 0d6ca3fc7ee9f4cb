"""Decoder layers called without an attention context (pipeline-parallel layers get only tensors) build
it once per micro-batch, not once per layer: the same ids (or detach() copies, as activation checkpointing
passes them) reuse it, and the outputs equal those of an explicitly built context; new ids or ids changed
in place build a new one. The backend choice is logged once per process."""

from __future__ import annotations

import logging

import torch

from mks2.model import attention
from mks2.model.attention import CONTEXT_CACHE, build_attention_context
from mks2.model.decoder import DecoderLayer, rotary_from_config
from tests.tiny import run_config


def _layers(n: int = 3):
    m = run_config("model.stage=base").model
    rotary = rotary_from_config(m)
    torch.manual_seed(0)
    return m, rotary, [DecoderLayer(m, i, rotary=rotary).eval() for i in range(n)]


def _ids(b: int = 2, s: int = 16):
    pos = torch.arange(s).repeat(b, 1)
    seg = torch.ones(b, s, dtype=torch.long)
    seg[1, 10:] = 0  # padding: the mask path (one host sync per build)
    return pos, seg


@torch.no_grad()
def test_layers_share_one_context_per_micro_batch():
    m, rotary, layers = _layers()
    pos, seg = _ids()
    x = torch.randn(2, 16, m.hidden_size)
    before = CONTEXT_CACHE.builds
    h = x
    for layer in layers:  # as a pipeline stage runs them; detach(): what activation checkpointing passes on
        h, _ = layer(h, pos.detach(), seg.detach())
    assert CONTEXT_CACHE.builds == before + 1
    ctx = build_attention_context(position_ids=pos, segment_ids=seg, rotary=rotary, dtype=x.dtype)
    ref = x
    for layer in layers:
        ref, _ = layer(ref, pos, seg, attn=ctx)
    torch.testing.assert_close(h, ref, rtol=0, atol=0)

    pos2, seg2 = _ids()  # the next micro-batch: new tensors
    layers[0](x, pos2, seg2)
    assert CONTEXT_CACHE.builds == before + 2
    seg2[0, 12:] = 2  # changed in place (version bump): the mask must be rebuilt
    out, _ = layers[0](x, pos2, seg2)
    assert CONTEXT_CACHE.builds == before + 3
    fresh = build_attention_context(position_ids=pos2, segment_ids=seg2, rotary=rotary, dtype=x.dtype)
    torch.testing.assert_close(out, layers[0](x, pos2, seg2, attn=fresh)[0], rtol=0, atol=0)
    attention.cached_attention_context(position_ids=pos2, segment_ids=seg2, rotary=rotary, dtype=torch.float64)
    assert CONTEXT_CACHE.builds == before + 4


def test_backend_logged_once(caplog):
    attention._log_backend_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="mks2.model"):
        for _ in range(3):
            attention.resolve_backend("auto", torch.device("cpu"), torch.float32)
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert lines == ["attention backend: PyTorch SDPA (fallback: cpu float32) [model.attention=auto, cpu float32]"]
