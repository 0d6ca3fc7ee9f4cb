"""The model on a CUDA device (bf16 kernels, SDPA masks, fused MoME mixing). Runs only where CUDA is."""

from __future__ import annotations

import pytest
import torch

from tests.model.model_helpers import build, random_ids, randomize_lora_, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return d, tiny_llama(d)


def test_fp32_cuda_matches_transformers(llama):
    d, hf = llama
    model = build(d, "model.stage=base").cuda()
    ids = random_ids(2, 40)
    with torch.no_grad():
        ref = hf.cuda()(ids.cuda()).logits
        torch.testing.assert_close(model(ids.cuda()).logits, ref, atol=1e-4, rtol=0)
    hf.cpu()


@pytest.mark.parametrize("attention", ["auto", "sdpa", "eager"])
def test_bf16_padding_and_packing_on_cuda(llama, attention):
    d, _ = llama
    model = build(d, "model.stage=base", "model.dtype=bf16", f"model.attention={attention}").cuda()
    lens = [7, 12, 5]
    seqs = [random_ids(1, n, seed=i)[0].cuda() for i, n in enumerate(lens)]
    with torch.no_grad():
        refs = [model(s[None]).logits[0].float() for s in seqs]
        total = sum(lens)
        ids = torch.cat(seqs)[None]
        seg = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lens)])[None].cuda()
        packed = model(ids, segment_ids=seg).logits[0].float()
        left = torch.zeros(1, 12, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(left)
        left[0, 5:], mask[0, 5:] = seqs[0][:7], 1
        padded = model(left, attention_mask=mask).logits[0, 5:].float()
    start = 0
    for n, ref in zip(lens, refs):
        assert (packed[start : start + n] - ref).abs().max() < 0.05 * ref.abs().max()
        start += n
    assert start == total
    assert (padded - refs[0]).abs().max() < 0.05 * refs[0].abs().max()


def test_mome_fused_mixing_matches_torch_reference(llama, tmp_path):
    d, _ = llama
    from tests.fixtures import make_tiny_clip

    make_tiny_clip(tmp_path)
    common = ("model.stage=mome", "model.mome.router_init_std=0.5", "model.dtype=bf16")
    fused = build(d, *common, "model.mome.kernel_backend=auto", vision_dir=tmp_path).cuda()
    randomize_lora_(fused)
    ref = build(d, *common, "model.mome.kernel_backend=torch", vision_dir=tmp_path).cuda()
    ref.load_state_dict(fused.state_dict())
    ids = random_ids(2, 33).cuda()
    a = fused(ids, labels=ids)
    b = ref(ids, labels=ids)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=0.05, rtol=0.02)
    a.loss.backward()
    b.loss.backward()
    ga = fused.model.layers[0].router.weight.grad.float()
    gb = ref.model.layers[0].router.weight.grad.float()
    assert (ga - gb).abs().max() <= 0.05 * gb.abs().max()
