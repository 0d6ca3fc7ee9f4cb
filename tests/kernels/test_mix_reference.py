"""mome_mix on the CPU: the torch reference backend against float64, gradcheck, torch.compile, dispatch and
input validation. (The Triton interpreter runs in test_mix_triton_interpret.py, in a subprocess.)"""

from __future__ import annotations

import os

import pytest
import torch
from mks2_kernels.op import resolve_backend

from mks2.config import KernelBackend
from mks2.ops import mome_mix
from tests.kernels.mix_cases import DTYPES, Case, check_backend

CASES = [
    Case(lead=(1,), d=8, E=2),
    Case(lead=(37,), d=100, E=3),
    Case(lead=(2, 13), d=72, E=2),
    Case(lead=(20,), d=33, E=5),
    Case(lead=(3, 7), d=48, E=2, layout="x_transposed"),
    Case(lead=(2, 9), d=40, E=2, layout="y_strided"),
    Case(lead=(17,), d=64, E=2, layout="w_fp32"),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_fp64(case: Case, dtype: str):
    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run
    check_backend("torch", case, DTYPES[dtype], "cpu", seed)


def _inputs64(lead=(3, 5), d=7, E=3):
    x = torch.randn(*lead, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(E, *lead, d, dtype=torch.float64, requires_grad=True)
    return x, w, y


def test_gradcheck_reference_fp64():
    assert torch.autograd.gradcheck(lambda x, w, y: mome_mix(x, w, y, backend="torch"), _inputs64())


def test_gradcheck_custom_op_fp64():
    """The registered custom op (what torch.compile traces) has the same, correct autograd formula."""
    x, w, y = _inputs64(lead=(6,))

    def through_op(x, w, y):
        out, _gates = torch.ops.mks2.mome_mix_fwd(x, w, y, "torch")
        return out

    assert torch.autograd.gradcheck(through_op, (x, w, y))


def test_torch_compile_module_on_cpu():
    class MoMEBlock(torch.nn.Module):
        def __init__(self, d: int = 16):
            super().__init__()
            self.router = torch.nn.Linear(d, 2, bias=False)
            self.e0 = torch.nn.Linear(d, d)
            self.e1 = torch.nn.Linear(d, d)

        def forward(self, u):
            return mome_mix(u, self.router.weight, torch.stack([self.e0(u), torch.tanh(self.e1(u))]))

    torch.manual_seed(0)
    block = MoMEBlock()
    torch.nn.init.normal_(block.router.weight, std=0.5)
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: the op must trace without graph breaks
    u = torch.randn(2, 5, 16, requires_grad=True)
    out_c = compiled(u)
    grads_c = torch.autograd.grad(out_c.square().sum(), [u, *block.parameters()])
    out_e = block(u)
    grads_e = torch.autograd.grad(out_e.square().sum(), [u, *block.parameters()])
    torch.testing.assert_close(out_c, out_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
    assert block.router.weight.grad is None and grads_c[1].abs().sum() > 0  # the router gets a gradient


def test_gates_sum_to_one_and_are_returned():
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16)
    w = torch.randn(3, 32)
    y = torch.randn(3, 4, 6, 32, dtype=torch.bfloat16)
    out, gates = mome_mix(x, w, y, return_gates=True)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert gates.shape == (4, 6, 3) and gates.dtype == torch.float32 and not gates.requires_grad
    torch.testing.assert_close(gates.sum(-1), torch.ones(4, 6))
    torch.testing.assert_close(gates, torch.softmax(x.float() @ w.t(), dim=-1))


def test_equal_experts_give_the_expert_and_uniform_router_averages():
    x = torch.randn(5, 16)
    e = torch.randn(5, 16)
    torch.testing.assert_close(mome_mix(x, torch.randn(2, 16), torch.stack([e, e])), e)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(mome_mix(x, torch.zeros(2, 16), torch.stack([a, b])), (a + b) / 2)


def test_empty_tokens_and_stride0_upstream_gradient():
    x = torch.randn(0, 8, requires_grad=True)
    out = mome_mix(x, torch.randn(2, 8), torch.randn(2, 0, 8))
    assert out.shape == (0, 8)
    # out.sum() hands the backward an expanded (stride-0) gradient: it must be made usable, not crash.
    x = torch.randn(3, 8, requires_grad=True)
    y = torch.randn(2, 3, 8, requires_grad=True)
    mome_mix(x, torch.randn(2, 8), y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and y.grad.shape == y.shape


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend(KernelBackend.CUDA, torch.device("cpu")) == "cuda"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        resolve_backend("fast", torch.device("cpu"))


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "y_shape", "match"),
    [
        ((4, 8), (2, 9), (2, 4, 8), "d=8"),
        ((4, 8), (2, 8), (3, 4, 8), r"expert_outputs must be \[E, ..., d\]"),
        ((4, 8), (2, 8), (2, 8), r"expert_outputs must be"),
        ((4, 8), (8,), (2, 4, 8), r"router_weight \[E, d\]"),
        ((4, 8), (0, 8), (0, 4, 8), "no experts"),
    ],
)
def test_bad_shapes_are_named(x_shape, w_shape, y_shape, match):
    with pytest.raises(ValueError, match=match):
        mome_mix(torch.randn(*x_shape), torch.randn(*w_shape), torch.randn(*y_shape))


def test_bad_dtypes_and_devices_are_named():
    x, w, y = torch.randn(4, 8), torch.randn(2, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="expert_outputs dtype torch.float16 differs"):
        mome_mix(x, w, y.half())
    with pytest.raises(ValueError, match="x dtype torch.float64 not supported"):
        mome_mix(x.double(), w, y.double(), backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        mome_mix(x, w, y, backend="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs Triton interpreted")
def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    x, w, y = torch.randn(4, 8), torch.randn(2, 8), torch.randn(2, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mome_mix(x, w, y, backend="triton")
