"""Triton kernels under TRITON_INTERPRET=1 against the float64 reference.

Run by test_mix_triton_interpret.py in a subprocess whose environment sets TRITON_INTERPRET=1 before
triton is imported (the interpreter is chosen when @triton.jit decorates the kernels), so the rest of
the suite keeps importing triton normally. Shapes are tiny: the interpreter costs ~7 ms per program.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.kernels.mix_cases import DTYPES, Case, check_backend

CASES = [
    Case(lead=(1,), d=40, E=2),  # a single token
    Case(lead=(37,), d=100, E=3),  # ragged T and d, odd E
    Case(lead=(2, 13), d=72, E=2),  # leading dims
    Case(lead=(20,), d=33, E=5),  # E padded to 8 inside the kernel
    Case(lead=(3, 7), d=48, E=2, layout="x_transposed"),
    Case(lead=(2, 9), d=40, E=2, layout="y_strided"),
    Case(lead=(17,), d=64, E=2, layout="w_fp32"),
]


def test_interpreter_is_on():
    from mks2_kernels import triton_mix

    assert os.environ.get("TRITON_INTERPRET") == "1" and triton_mix.INTERPRETED


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_fp64(case: Case, dtype: str):
    seed = hash((case.id, dtype)) % 2**31 ^ int.from_bytes(os.urandom(2), "little")  # fresh inputs each run
    check_backend("triton", case, DTYPES[dtype], "cpu", seed)


def test_triton_dw_partials_reduce_over_splits():
    """T large enough that the dx/dw kernel splits the tokens (2 splits on CPU): dw must sum them."""
    check_backend("triton", Case(lead=(40,), d=24, E=2), torch.float32, "cpu", seed=7)
