"""Fused backends on a CUDA device against the float64 reference (skipped without a GPU).

CI has no GPU; this runs on a GPU machine: ``python -m pytest -q tests/kernels/test_mix_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.kernels.mix_cases import DTYPES, Case, check_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible)"),
]

CASES = [
    Case(lead=(1,), d=4096, E=2),  # one token
    Case(lead=(1000,), d=5120, E=2),  # Llama-2-13B width
    Case(lead=(2, 300), d=4096, E=2),  # leading dims
    Case(lead=(77,), d=4100, E=2),  # d not a multiple of 8: the CUDA scalar path, Triton masks
    Case(lead=(129,), d=1000, E=3),
    Case(lead=(64,), d=256, E=13),  # E > 8: several expert groups in the CUDA kernels
    Case(lead=(3, 50), d=512, E=2, layout="x_transposed"),
    Case(lead=(4, 33), d=512, E=2, layout="y_strided"),
    Case(lead=(100,), d=4096, E=2, layout="w_fp32"),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fused_matches_fp64(backend: str, case: Case, dtype: str):
    seed = hash((case.id, dtype, backend)) % 2**31 ^ int.from_bytes(os.urandom(2), "little")
    errs = check_backend(backend, case, DTYPES[dtype], "cuda", seed)
    print(backend, case.id, dtype, {k: f"{v:.2e}" for k, v in errs.items()})


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_is_deterministic(backend: str):
    from mks2_kernels.op import mome_mix

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    w = (0.05 * torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16, generator=g)).requires_grad_()
    y = torch.randn(2, 4096, 4096, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    dout = torch.randn_like(x)
    first = torch.autograd.grad(mome_mix(x, w, y, backend=backend), (x, w, y), dout)
    second = torch.autograd.grad(mome_mix(x, w, y, backend=backend), (x, w, y), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: bit-identical gradients


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_traces_the_op(backend: str):
    from mks2_kernels.op import mome_mix

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(256, 2, bias=False, device="cuda", dtype=torch.bfloat16)
            self.up = torch.nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)

        def forward(self, u):
            experts = torch.stack([self.up(u), torch.nn.functional.silu(u)])
            return mome_mix(u, self.router.weight, experts, backend=backend) * 2

    torch._dynamo.reset()
    block = Block()
    compiled = torch.compile(block, fullgraph=True)
    u = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out_c = compiled(u)
    (gu_c,) = torch.autograd.grad(out_c.float().square().sum(), u)
    out_e = block(u)
    (gu_e,) = torch.autograd.grad(out_e.float().square().sum(), u)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)  # same kernels, same bits
    # Inductor fuses the loss around the op in its own precision: compare gradients by relative norm.
    assert ((gu_c.double() - gu_e.double()).norm() / gu_e.double().norm()).item() < 1e-2
