"""Launch-configuration sweep of the Triton mixing kernels on a GPU (how the defaults were chosen).

``python kernels/tune.py [--d 4096] [--tokens 16384] [--dtype bf16]`` times each kernel alone over a grid
of (BLOCK_T, BLOCK_D, num_warps[, programs per SM]) with ``triton.testing.do_bench`` (median) and prints
GB/s from the kernel's minimum bytes, best first, plus the CUDA backend's kernels for comparison.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from mks2_kernels import triton_mix
from triton.testing import do_bench

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--skip-triton", action="store_true", help="only time the CUDA backend")
    ap.add_argument("--no-sweep", action="store_true", help="no Triton config sweep: time the defaults only")
    ap.add_argument(
        "--cuda-defines",
        action="append",
        default=[],
        help="a CUDA build variant, e.g. MKS2_ROW_WARPS=8,MKS2_ROW_UNROLL=4 (repeatable; each runs in a subprocess)",
    )
    args = ap.parse_args()
    if len(args.cuda_defines) > 1:  # one build per process: the first loaded build owns the process
        import subprocess
        import sys

        for spec in args.cuda_defines:
            cmd = [sys.executable, __file__, "--skip-triton", "--cuda-defines", spec, "--d", str(args.d)]
            subprocess.run(cmd + ["--tokens", str(args.tokens), "--dtype", args.dtype], check=False)
        return
    T, d, E, dtype = args.tokens, args.d, args.experts, DTYPES[args.dtype]
    s = torch.finfo(dtype).bits // 8
    x = torch.randn(T, d, device="cuda", dtype=dtype)
    w = 0.02 * torch.randn(E, d, device="cuda", dtype=dtype)
    y = torch.randn(E, T, d, device="cuda", dtype=dtype)
    go = torch.randn(T, d, device="cuda", dtype=dtype)
    _, gates = triton_mix.forward(x, w, y)

    # The backward is two kernels; time them apart by running dxdw on a precomputed dlogits.
    def run_dy():
        triton_mix.backward(go, x, w, y, gates)

    bytes_ = {"fwd": (2 + E) * T * d * s, "dy": (1 + 2 * E) * T * d * s, "dxdw": 2 * T * d * s}
    grids = {
        "fwd": itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8]),
        "dy": itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8]),
        "dxdw": itertools.product([16, 32, 64], [64, 128, 256, 512], [4, 8], [2, 4, 8]),
    }
    for kernel, grid in grids.items() if not (args.skip_triton or args.no_sweep) else ():
        results = []
        for cfg in grid:
            if kernel in ("fwd", "dy") and cfg[0] * cfg[1] > 16384:
                continue
            triton_mix.OVERRIDE.clear()
            triton_mix.OVERRIDE[kernel] = cfg
            fn = (lambda: triton_mix.forward(x, w, y)) if kernel == "fwd" else run_dy
            try:
                ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
            except Exception as exc:  # e.g. out of shared memory for a config
                print(f"{kernel} {cfg}: failed ({type(exc).__name__})")
                continue
            results.append((ms, cfg))
        triton_mix.OVERRIDE.clear()
        results.sort()
        print(f"== {kernel} (T={T} d={d} E={E} {args.dtype}); dy/dxdw rows time the whole backward")
        for ms, cfg in results[: args.top]:
            note = f"{bytes_[kernel] / ms / 1e6:8.1f} GB/s" if kernel == "fwd" else ""
            print(f"  {cfg}: {ms * 1e3:8.1f} us {note}")

    full = {} if args.skip_triton else {"triton": triton_mix}
    defines = {}
    for spec in args.cuda_defines[:1]:
        defines = {k: int(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
    try:
        from mks2_kernels import cuda_mix

        cuda_mix.load(defines=defines)
        full["cuda"] = cuda_mix
    except Exception as exc:
        print(f"cuda backend unavailable: {exc}")
    bwd_bytes = (3 + 2 * E) * T * d * s
    for name, mod in full.items():
        f = do_bench(lambda mod=mod: mod.forward(x, w, y), warmup=10, rep=50, return_mode="median")
        b = do_bench(lambda mod=mod: mod.backward(go, x, w, y, gates), warmup=10, rep=50, return_mode="median")
        label = f"{name} {defines}" if name == "cuda" and defines else f"{name} default"
        print(f"{label:60s}: fwd {f * 1e3:8.1f} us ({bytes_['fwd'] / f / 1e6:7.1f} GB/s)  "
              f"bwd {b * 1e3:8.1f} us ({bwd_bytes / b / 1e6:7.1f} GB/s)")  # fmt: skip


if __name__ == "__main__":
    main()
