"""CUDA C++ backend of the soft-MoME token mixing: JIT-built on first use, cached on disk.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` the first time the
``cuda`` backend runs (about a minute; needs nvcc and ninja) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes reuse the build
unless a source changed. Concurrent processes wait on torch's build lock. The library registers the
ops ``torch.ops.mks2_cuda.mix_fwd`` / ``mix_bwd``, which write into outputs allocated here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from mks2_kernels._alloc import empty

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "mome_mix.cpp", CSRC / "mome_mix_kernels.cu")
_lock = threading.Lock()
_ops = None  # torch.ops namespace of the loaded build
_col_threads = 128  # threads per block of the dx/dw kernel (MKS2_COL_THREADS in the .cu)


def load(verbose: bool = False, defines: dict[str, int] | None = None) -> None:
    """Build (or reuse the cached build of) the extension and load it into this process.

    ``defines``: launch-shape knobs of csrc/mome_mix_kernels.cu (MKS2_ROW_WARPS, MKS2_ROW_UNROLL,
    MKS2_COL_THREADS, MKS2_COL_UNROLL) for tuning sweeps; each distinct set is its own build and op
    namespace. The first load in a process wins.
    """
    global _ops, _col_threads
    if _ops is not None:
        return
    with _lock:
        if _ops is not None:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("mome_mix backend='cuda' needs a CUDA build of torch and a visible GPU")
        from torch.utils.cpp_extension import load as cpp_load

        defines = dict(defines or {})
        suffix = "_".join(f"{k.removeprefix('MKS2_').lower()}{v}" for k, v in sorted(defines.items()))
        namespace = "mks2_cuda" + (f"_{suffix}" if suffix else "")
        flags = [f"-D{k}={v}" for k, v in defines.items()] + [f"-DMKS2_CUDA_LIB={namespace}"]
        cpp_load(
            name="mks2_mome_mix" + (f"_{suffix}" if suffix else ""),
            sources=[str(p) for p in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", *flags],
            extra_cuda_cflags=["-O3", "-lineinfo", *flags],
            is_python_module=False,
            verbose=verbose,
        )
        _col_threads = defines.get("MKS2_COL_THREADS", 128)
        _ops = getattr(torch.ops, namespace)


def dxdw_splits(T: int, d: int, device: torch.device) -> int:
    """Token splits of the dx/dw kernel: about 4 blocks per SM, at least 16 tokens per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    col_blocks = -(-d // (_col_threads * 8))
    return max(1, min(-(-4 * sms // col_blocks), -(-T // 16)))


def forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], w [E, d], y [E, T, d] (unit-stride last dims) -> (out [T, d], gates [T, E] fp32)."""
    load()
    T, d = x.shape
    out = empty((T, d), dtype=x.dtype, device=x.device)
    gates = empty((T, w.shape[0]), dtype=torch.float32, device=x.device)
    _ops.mix_fwd(x, w, y, out, gates)
    return out, gates


def backward(
    grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [T, d], dw [E, d], dy [E, T, d]) in the dtypes of x, w, y."""
    load()
    T, d = x.shape
    E = w.shape[0]
    splits = dxdw_splits(T, d, x.device)
    dy = empty((E, T, d), dtype=y.dtype, device=x.device)
    dlogits = empty((T, E), dtype=torch.float32, device=x.device)
    dx = empty((T, d), dtype=x.dtype, device=x.device)
    dw_part = empty((splits, E, d), dtype=torch.float32, device=x.device)
    _ops.mix_bwd(grad_out, x, w, y, gates, dy, dlogits, dx, dw_part)
    dw = dw_part.sum(0) if splits > 1 else dw_part[0]  # [E, d] fp32, deterministic two-stage reduction
    return dx, dw.to(w.dtype), dy
