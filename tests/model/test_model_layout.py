"""Padding and packing: a padded or packed batch gives exactly the logits of the separate sequences."""

from __future__ import annotations

import pytest
import torch

from mks2.model import prepare_positions
from mks2.model.attention import AttentionContext, attention_kernel, segment_mask, varlen_layout
from mks2.model.modeling import causal_lm_loss, positions_from_segments
from tests.model.model_helpers import build, random_ids, tiny_llama

ATOL = 1e-5
LENGTHS = [9, 14, 5]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf = tiny_llama(d)
    return d, hf


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, llama_dir):
    return build(llama_dir[0], "model.stage=base", f"model.attention={request.param}")


def separate_logits(model, seqs):
    with torch.no_grad():
        return [model(s[None]).logits[0] for s in seqs]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded(model, llama_dir, side):
    seqs = [random_ids(1, n, seed=i)[0] for i, n in enumerate(LENGTHS)]
    s = max(LENGTHS)
    ids = torch.zeros(len(seqs), s, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for b, seq in enumerate(seqs):
        sl = slice(s - len(seq), s) if side == "left" else slice(0, len(seq))
        ids[b, sl], mask[b, sl] = seq, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        hf = llama_dir[1]
        for b, (seq, ref) in enumerate(zip(seqs, separate_logits(model, seqs))):
            real = mask[b].bool()
            torch.testing.assert_close(padded[b, real], ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(ref, hf(seq[None]).logits[0], atol=ATOL, rtol=0)
        assert torch.isfinite(padded).all()  # padding rows must not produce NaN either
        # Same batch expressed as segment ids (0 = pad) instead of an attention mask.
        torch.testing.assert_close(model(ids, segment_ids=mask).logits[mask.bool()], padded[mask.bool()])


def test_packed_documents_equal_separate_sequences(model):
    seqs = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(LENGTHS)]
    total = sum(LENGTHS)
    # Row 0: the three documents packed + 2 padding tokens; row 1: one document then padding.
    ids = torch.zeros(2, total + 2, dtype=torch.long)
    seg = torch.zeros(2, total + 2, dtype=torch.long)
    ids[0, :total] = torch.cat(seqs)
    seg[0, :total] = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(LENGTHS)])
    ids[1, : LENGTHS[1]], seg[1, : LENGTHS[1]] = seqs[1], 1
    with torch.no_grad():
        packed = model(ids, segment_ids=seg).logits
    refs = separate_logits(model, seqs)
    start = 0
    for n, ref in zip(LENGTHS, refs):
        torch.testing.assert_close(packed[0, start : start + n], ref, atol=ATOL, rtol=0)
        start += n
    torch.testing.assert_close(packed[1, : LENGTHS[1]], refs[1], atol=ATOL, rtol=0)


def test_positions_restart_per_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    pos = positions_from_segments(seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 4, 5]]
    # attention_mask and segment_ids combine: a token is real only if both say so.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    pos2, seg2 = prepare_positions(torch.zeros_like(seg), attention_mask=mask, segment_ids=seg)
    assert seg2.tolist() == [[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert pos2[1].tolist() == [0, 0, 0, 1, 2, 3, 0, 0]
    p3, s3 = prepare_positions(torch.zeros(2, 4, dtype=torch.long))
    assert s3 is None and p3.tolist() == [[0, 1, 2, 3]] * 2


def test_segment_mask_never_crosses_documents():
    seg = torch.tensor([[1, 1, 2, 2, 0]])
    m = segment_mask(seg)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding sees only itself (keeps SDPA finite), nobody sees padding
    ]


def test_flash_varlen_path_unpads_and_repads(monkeypatch):
    """The flash-attn branch (unpadding, cu_seqlens, re-padding) checked on CPU with a stand-in
    varlen kernel that runs SDPA per document: must equal the SDPA masked path."""
    from mks2.model import attention as attn_mod

    calls = []

    def fake_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        calls.append((cu_seqlens_q.tolist(), max_seqlen_q))
        outs = []
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            qd, kd, vd = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, hd]
            kd = kd.repeat_interleave(q.shape[1] // k.shape[1], 0)
            vd = vd.repeat_interleave(q.shape[1] // v.shape[1], 0)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attn_mod, "_flash_attn", lambda: (None, fake_varlen))
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [0, 0, 1, 1, 1, 1]])
    b, s, h, hkv, d = 2, 6, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, generator=gen) for n in (h, hkv, hkv))
    cos, sin = torch.ones(b, s, d), torch.zeros(b, s, d)
    flash = attention_kernel(q, k, v, AttentionContext("flash", cos, sin, varlen=varlen_layout(seg)))
    sdpa = attention_kernel(q, k, v, AttentionContext("sdpa", cos, sin, mask=segment_mask(seg)))
    assert calls == [([0, 3, 5, 9], 4)]
    real = seg > 0
    torch.testing.assert_close(flash[real], sdpa[real], atol=1e-6, rtol=0)
    assert (flash[~real] == 0).all()


def test_loss_is_mean_token_ce_and_ignores_document_boundaries():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 11, generator=gen)
    labels = torch.tensor([[-100, 4, 5, 6, 7, -100]])
    loss, n = causal_lm_loss(logits, labels)
    manual = torch.nn.functional.cross_entropy(logits[0, :4], torch.tensor([4, 5, 6, 7]))
    assert n.item() == 4 and torch.allclose(loss, manual)
    # Packed: token 3 starts document 2, so position 2 must not be trained to predict it.
    seg = torch.tensor([[1, 1, 1, 2, 2, 2]])
    loss2, n2 = causal_lm_loss(logits, labels, seg)
    manual2 = torch.nn.functional.cross_entropy(logits[0, [0, 1, 3]], torch.tensor([4, 5, 7]))
    assert n2.item() == 3 and torch.allclose(loss2, manual2)
    # No label at all: zero loss, not NaN.
    loss3, n3 = causal_lm_loss(logits, torch.full_like(labels, -100))
    assert n3.item() == 0 and loss3.item() == 0.0


def test_model_loss_matches_manual_shift(llama_dir):
    model = build(llama_dir[0], "model.stage=base")
    ids = random_ids(2, 12)
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, 3:-1].reshape(-1, out.logits.shape[-1]), ids[:, 4:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, ref)
    assert out.aux["num_loss_tokens"].item() == 2 * 8
