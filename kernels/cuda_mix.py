"""CUDA C++ backend of the soft-MoME token mixing: JIT-built on first use, cached on disk.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` the first time the
``cuda`` backend runs (about a minute; needs nvcc and ninja) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes reuse the build
unless a source changed. Concurrent processes wait on torch's build lock. The kernels register the
ops ``torch.ops.mks2_cuda.mix_fwd`` / ``mix_bwd`` (see csrc/mome_mix.cpp).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "mome_mix.cpp", CSRC / "mome_mix_kernels.cu")
_lock = threading.Lock()
_loaded = False


def load(verbose: bool = False) -> None:
    """Build (or reuse the cached build of) the extension and load it into this process."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("mome_mix backend='cuda' needs a CUDA build of torch and a visible GPU")
        from torch.utils.cpp_extension import load as cpp_load

        cpp_load(
            name="mks2_mome_mix_cuda",
            sources=[str(p) for p in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"],
            is_python_module=False,
            verbose=verbose,
        )
        _loaded = True


def forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], w [E, d], y [E, T, d] (unit-stride last dims) -> (out [T, d], gates [T, E] fp32)."""
    load()
    return torch.ops.mks2_cuda.mix_fwd(x, w, y)


def backward(
    grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [T, d], dw [E, d], dy [E, T, d]) in the dtypes of x, w, y."""
    load()
    return torch.ops.mks2_cuda.mix_bwd(grad_out, x, w, y, gates)
