"""Benchmark harness of the fused soft-MoME token mixing (issue #5): ``python kernels/bench.py``.

Part 1, the mixing op alone. Sweeps Llama-2-7B/13B shapes (d = 4096 and 5120, E = 2, T = 1k..64k tokens)
for the forward, the backward and both, over the backends

    fused-triton   mks2.ops.mome_mix(..., backend="triton")
    fused-cuda     mks2.ops.mome_mix(..., backend="cuda")     (JIT-built CUDA C++)
    eager          the op as plain differentiable PyTorch     (mks2_kernels.reference.mix_autograd)
    compile        torch.compile of that same function

and reports the median and 20th/80th percentiles (``triton.testing.do_bench`` on CUDA), the bandwidth
GB/s computed from the MINIMUM bytes a pass must move (each input read once, each output written once;
see ``min_bytes``), that bandwidth as a % of the device's measured copy bandwidth, and speedups over
eager and compile.

Part 2, the whole MoME FFN block (both expert SwiGLU FFNs + mixing) against two plain FFNs summed,
forward + backward, with the peak activation memory of each variant (CUDA allocator peak above the
inputs and weights) and the bytes autograd saves for the backward.

Writes ``mix.csv``, ``block.csv``, ``meta.json`` (device, versions, git commit, copy bandwidth, target
checks) and ``mix.png`` under ``--out``. ``--device cpu --quick`` runs a tiny smoke sweep on the CPU
(wall-clock timer): its figures are NOT meaningful and are labelled so in every output.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "both")
FFN_SIZES = {4096: 11008, 5120: 13824}  # Llama-2-7B / 13B intermediate sizes
CPU_NOTE = "CPU smoke run: figures NOT meaningful"


# ----------------------------------------------------------------------------------------------
# Timing and environment
# ----------------------------------------------------------------------------------------------


def make_timer(device: torch.device, quick: bool) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    """fn -> (median, p20, p80) in ms. CUDA: triton.testing.do_bench (events, L2 flushed between runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def cuda_timer(fn):
            med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return float(med), float(p20), float(p80)

        return cuda_timer

    reps = 3 if quick else 20

    def cpu_timer(fn):
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
        return statistics.median(times), q[1], q[7]

    return cpu_timer


def copy_bandwidth(device: torch.device, timer, quick: bool) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = (1 << 20) * (8 if quick else 1024)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    med, _, _ = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (med * 1e-3) / 1e9


def git_commit() -> str:
    """HEAD of the repository (+dirty if kernels/ has changes); $MKS2_BENCH_COMMIT when there is no .git."""
    if os.environ.get("MKS2_BENCH_COMMIT"):
        return os.environ["MKS2_BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "kernels"], cwd=REPO, capture_output=True, text=True)
        return sha.stdout.strip() + ("+dirty(kernels)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    import triton

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.machine()}, {os.cpu_count()} threads)"
        ),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["sms"] = props.multi_processor_count
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        meta["note"] = CPU_NOTE
        meta["cpu_threads"] = torch.get_num_threads()
    return meta


# ----------------------------------------------------------------------------------------------
# Part 1: the mixing op
# ----------------------------------------------------------------------------------------------


def min_bytes(pass_: str, T: int, d: int, E: int, elem: int, w_elem: int) -> int:
    """Fewest bytes a pass must move through device memory.

    fwd:  read x, y[E], w; write out                       -> (2 + E) T d + E d
    bwd:  read dout, y[E], x, w; write dy[E], dx, dw        -> (3 + 2E) T d + 2 E d
          (the fp32 gates [T, E] saved by the forward are negligible and not counted)
    both: the sum (the backward cannot start before dout exists)
    """
    fwd = (2 + E) * T * d * elem + E * d * w_elem
    bwd = (3 + 2 * E) * T * d * elem + 2 * E * d * w_elem
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[pass_]


def _fused(backend: str) -> Callable:
    from mks2_kernels.op import mome_mix

    return lambda x, w, y: mome_mix(x, w, y, backend=backend)


def mix_functions(backends: list[str]) -> dict[str, Callable | None]:
    from mks2_kernels.reference import mix_autograd

    fns: dict[str, Callable | None] = {}
    for b in backends:
        if b.startswith("fused-"):
            fns[b] = _fused(b.removeprefix("fused-"))
        elif b == "eager":
            fns[b] = mix_autograd
        elif b == "compile":
            fns[b] = None  # compiled per shape (static shapes, like a training run), see run_mix
        else:
            raise ValueError(f"unknown backend {b!r}: fused-triton, fused-cuda, fused-torch, eager or compile")
    return fns


_SIDE_STREAM: torch.cuda.Stream | None = None


def graphed(fn: Callable[[], object]) -> tuple[Callable[[], None], Callable[[], None]]:
    """Capture fn in a CUDA graph; returns (replay, release). Replays time the GPU work alone, without the
    Python/launch gaps that an isolated ~0.5 ms op otherwise shows on a slow host CPU."""
    global _SIDE_STREAM
    if _SIDE_STREAM is None:  # one side stream for every warm-up: the allocator caches blocks per stream
        _SIDE_STREAM = torch.cuda.Stream()
    _SIDE_STREAM.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(_SIDE_STREAM):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(_SIDE_STREAM)
    for attempt in range(2):  # the first capture of a process has been seen to fail once with Triton 3.6
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            break
        except Exception as exc:  # torch.AcceleratorError / RuntimeError from the capture
            graph.reset()
            if attempt == 1:
                raise
            print(f"  (CUDA graph capture failed once, retrying: {str(exc).splitlines()[0][:120]})", flush=True)

    def release() -> None:
        graph.reset()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    return graph.replay, release


def time_mix_passes(timer, fn: Callable, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor, graph: bool) -> dict:
    """(median, p20, p80) ms of the forward, the backward alone and both, for fn(*inputs)."""
    torch.autograd.grad(fn(*inputs), inputs, dout)  # warm-up: JIT builds and compilation stay out of the numbers
    out = fn(*inputs)  # a graph the backward-only timing replays (retain_graph)
    passes = {
        "fwd": lambda: fn(*inputs),
        "bwd": lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
        "both": lambda: torch.autograd.grad(fn(*inputs), inputs, dout),
    }
    times = {}
    for name, run in passes.items():
        if not graph:
            times[name] = timer(run)
            continue
        replay, release = graphed(run)
        try:
            times[name] = timer(replay)
        finally:
            release()
    return times


def run_mix(args, device, timer, copy_bw, meta, out_dir: Path) -> list[dict]:
    from mks2_kernels.reference import mix_autograd

    fns = mix_functions(args.backends)
    timings = ["launch", "graph"] if device.type == "cuda" and not args.no_graph else ["launch"]
    dtype = DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    rows: list[dict] = []
    for d in args.d:
        for T in args.tokens:
            E = args.experts
            gen = torch.Generator(device=device).manual_seed(T * 7 + d)
            x = torch.randn(T, d, device=device, dtype=dtype, generator=gen).requires_grad_()
            w = (0.02 * torch.randn(E, d, device=device, dtype=dtype, generator=gen)).requires_grad_()
            y = torch.randn(E, T, d, device=device, dtype=dtype, generator=gen).requires_grad_()
            dout = torch.randn(T, d, device=device, dtype=dtype, generator=gen)
            shape_rows = []
            for b, fn in fns.items():
                if fn is None:  # compile: a fresh static-shape compilation for this shape
                    torch._dynamo.reset()
                    fn = torch.compile(mix_autograd, dynamic=False)
                for timing in timings:
                    try:
                        times = time_mix_passes(timer, fn, (x, w, y), dout, graph=timing == "graph")
                    except Exception as exc:  # a backend unavailable here (no nvcc, no GPU): say so, go on
                        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                        print(f"  {b} ({timing}): skipped ({type(exc).__name__}: {msg})", flush=True)
                        continue
                    for p in args.passes:
                        med, p20, p80 = times[p]
                        nbytes = min_bytes(p, T, d, E, elem, elem)
                        gbps = nbytes / (med * 1e-3) / 1e9
                        shape_rows.append(
                            dict(device=meta["device"], dtype=args.dtype, d=d, E=E, T=T, pass_=p, backend=b,
                                 timing=timing, median_ms=med, p20_ms=p20, p80_ms=p80, min_bytes=nbytes, gbps=gbps,
                                 pct_copy_bw=100 * gbps / copy_bw)
                        )  # fmt: skip
            for r in shape_rows:  # speedups over the two baselines at the same shape, pass and timing
                for base in ("eager", "compile"):
                    ref = next(
                        (q for q in shape_rows if q["backend"] == base and q["pass_"] == r["pass_"]
                         and q["timing"] == r["timing"]),
                        None,
                    )  # fmt: skip
                    r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ref else float("nan")
            rows += shape_rows
            for r in shape_rows:
                print(fmt_mix_row(r), flush=True)
            write_csv(out_dir / "mix.csv", rows, note=meta.get("note"))
            del x, w, y, dout
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def fmt_mix_row(r: dict) -> str:
    return (
        f"d={r['d']:5d} T={r['T']:6d} {r['pass_']:4s} {r['backend']:13s} {r['timing']:6s} {r['median_ms']:9.3f} ms "
        f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  {r['gbps']:8.1f} GB/s  {r['pct_copy_bw']:5.1f}% copy  "
        f"x{r['speedup_vs_eager']:.2f} eager  x{r['speedup_vs_compile']:.2f} compile"
    )


# ----------------------------------------------------------------------------------------------
# Part 2: the MoME FFN block
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Llama FFN: down(silu(gate(u)) * up(u)). Frozen here, like the expert bases in stage 2."""

    def __init__(self, d: int, ffn: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate = nn.Linear(d, ffn, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(d, ffn, bias=False, dtype=dtype, device=device)
        self.down = nn.Linear(ffn, d, bias=False, dtype=dtype, device=device)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(u)) * self.up(u))


def _mome_block(mix: Callable) -> Callable:
    """u [T, d] -> mix(u, W_r, stack([FFN0(u), FFN1(u)])), the MoME FFN block."""
    return lambda u, f0, f1, w: mix(u, w, torch.stack([f0(u), f1(u)]))


def block_variants(backends: list[str]) -> dict[str, Callable]:
    """name -> f(u, ffn0, ffn1, router_weight) for the block benchmark."""
    from mks2_kernels.reference import mix_autograd

    variants: dict[str, Callable] = {"two-ffn": lambda u, f0, f1, w: f0(u) + f1(u)}
    for b in backends:
        if b.startswith("fused-"):
            variants[f"mome-{b}"] = _mome_block(_fused(b.removeprefix("fused-")))
        elif b == "eager":
            variants["mome-eager"] = _mome_block(mix_autograd)
        elif b == "compile":
            variants["mome-compile"] = _mome_block(torch.compile(mix_autograd, dynamic=False))
    return variants


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run fn, returning its output and the bytes autograd saved for the backward (unique storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not (isinstance(t, nn.Parameter) or getattr(t, "_is_param", False)):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def measure_block(device, timer, fn: Callable, args: tuple, inputs: tuple, dout: torch.Tensor) -> dict:
    """Time fwd+bwd of fn(*args) and measure its activation memory."""
    torch.autograd.grad(fn(*args), inputs, dout)  # warm-up / compile
    # Peak activation memory: the allocator's peak during forward+backward above what was live before.
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out, saved = saved_bytes(lambda: fn(*args))
    torch.autograd.grad(out, inputs, dout)
    del out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    med, p20, p80 = timer(lambda: torch.autograd.grad(fn(*args), inputs, dout))
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_act_mib=peak, saved_mib=saved / 2**20)


def run_block(args, device, timer, meta, out_dir: Path) -> list[dict]:
    if args.experts != 2:
        raise ValueError("the MoME block benchmark has exactly two experts (MLP and MVM): use --experts 2")
    dtype = DTYPES[args.dtype]
    rows: list[dict] = []
    for d in args.block_d:
        ffn = args.block_ffn or FFN_SIZES.get(d, int(8 * d / 3))
        T = args.block_tokens
        gen = torch.Generator(device=device).manual_seed(d)
        torch.manual_seed(d)
        f0, f1 = SwiGLU(d, ffn, dtype, device), SwiGLU(d, ffn, dtype, device)
        w = (0.02 * torch.randn(2, d, device=device, dtype=dtype, generator=gen)).requires_grad_()
        u = torch.randn(T, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        dout = torch.randn(T, d, device=device, dtype=dtype, generator=gen)
        shape_rows = []
        for name, fn in block_variants(args.backends).items():
            inputs = (u,) if name == "two-ffn" else (u, w)  # two plain FFNs have no router
            try:
                res = measure_block(device, timer, fn, (u, f0, f1, w), inputs, dout)
            except Exception as exc:
                print(f"  block {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
                continue
            shape_rows.append(dict(device=meta["device"], dtype=args.dtype, d=d, ffn=ffn, T=T, variant=name, **res))
        base_ms = next((r["median_ms"] for r in shape_rows if r["variant"] == "two-ffn"), float("nan"))
        for r in shape_rows:
            r["vs_two_ffn"] = r["median_ms"] / base_ms
            print(
                f"block d={d} ffn={ffn} T={T} {r['variant']:18s} {r['median_ms']:9.3f} ms "
                f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  x{r['vs_two_ffn']:.3f} of two-ffn  "
                f"peak act {r['peak_act_mib']:9.1f} MiB  saved {r['saved_mib']:9.1f} MiB",
                flush=True,
            )
        rows += shape_rows
        write_csv(out_dir / "block.csv", rows, note=meta.get("note"))
        del f0, f1, u, w, dout
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], note: str | None) -> None:
    """Atomic write (temp file + rename): a half-written CSV never replaces a complete one."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k.rstrip("_") for k in keys])
        writer.writeheader()
        for r in rows:
            writer.writerow({k.rstrip("_"): (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        if note:
            f.write(f"# {note}\n")
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """GB/s vs T per backend: solid lines graph-replay timing (when measured), dashed launch timing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = sorted({r["d"] for r in rows})
    passes = [p for p in PASSES if any(r["pass_"] == p for r in rows)]
    fig, axes = plt.subplots(len(passes), len(ds), figsize=(5.5 * len(ds), 3.6 * len(passes)), squeeze=False)
    for i, p in enumerate(passes):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for k, b in enumerate(dict.fromkeys(r["backend"] for r in rows)):
                for timing, style in (("graph", "-"), ("launch", "--")):
                    pts = sorted(
                        (r["T"], r["gbps"])
                        for r in rows
                        if r["d"] == d and r["pass_"] == p and r["backend"] == b and r["timing"] == timing
                    )
                    if pts:
                        ax.plot([t for t, _ in pts], [g for _, g in pts], style, marker="o", color=f"C{k}",
                                label=f"{b} ({timing})")  # fmt: skip
            ax.axhline(meta["copy_bw_gbps"], color="gray", linestyle=":", label="copy bandwidth")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{p}, d={d}, E={rows[0]['E']}, {rows[0]['dtype']}")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("GB/s (minimum bytes)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = f"soft-MoME mixing on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})"
    if "note" in meta:
        title += f"\n{meta['note']}"
    fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def target_checks(rows: list[dict], block_rows: list[dict], dtype: str) -> list[dict]:
    """The issue's GPU targets, evaluated at d=4096, T=16k, fwd+bwd ('both'), for each timing method."""
    checks = []
    for timing in dict.fromkeys(r["timing"] for r in rows):
        at = {
            r["backend"]: r
            for r in rows
            if r["d"] == 4096 and r["T"] == 16384 and r["pass_"] == "both" and r["timing"] == timing
        }
        for b in ("fused-triton", "fused-cuda"):
            r = at.get(b)
            if r is None:
                continue
            where = f"(d=4096 T=16k {dtype} fwd+bwd, {timing} timing)"
            checks.append(
                dict(target=f"{b} >= 80% copy bw {where}", value=r["pct_copy_bw"], met=r["pct_copy_bw"] >= 80)
            )
            checks.append(dict(target=f"{b} >= 2x eager {where}", value=r["speedup_vs_eager"],
                               met=r["speedup_vs_eager"] >= 2))  # fmt: skip
            checks.append(dict(target=f"{b} >= 1.2x torch.compile {where}", value=r["speedup_vs_compile"],
                               met=r["speedup_vs_compile"] >= 1.2))  # fmt: skip
    for d in sorted({r["d"] for r in block_rows}):
        eager = next((r for r in block_rows if r["d"] == d and r["variant"] == "mome-eager"), None)
        for r in block_rows:
            if eager and r["d"] == d and r["variant"].startswith("mome-fused") and not math.isnan(r["peak_act_mib"]):
                checks.append(dict(target=f"block d={d} {r['variant']} peak activation < eager's",
                                   value=r["peak_act_mib"] / eager["peak_act_mib"],
                                   met=r["peak_act_mib"] < eager["peak_act_mib"]))  # fmt: skip
    return checks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny smoke sweep (with --device cpu: not meaningful)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--d", type=int, nargs="+", help="hidden sizes (default 4096 5120)")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts T (default 1k..64k, powers of 2)")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    ap.add_argument("--backends", nargs="+", help="fused-triton fused-cuda fused-torch eager compile")
    ap.add_argument("--block-d", type=int, nargs="*", help="hidden sizes of the MoME block benchmark ([] skips it)")
    ap.add_argument("--block-ffn", type=int, help="FFN width of the block (default: Llama-2's for d)")
    ap.add_argument("--block-tokens", type=int, help="tokens of the block benchmark (default 4096)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_kernels", help="output folder")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if args.d is None:
        args.d = [128] if cpu and args.quick else [256] if cpu else [4096, 5120]
    if args.tokens is None:
        args.tokens = [64, 256] if cpu and args.quick else [1 << k for k in range(10, 17)]
    if args.backends is None:
        args.backends = ["fused-torch", "eager"] if cpu else ["fused-triton", "fused-cuda", "eager", "compile"]
    if args.block_d is None:
        args.block_d = [64] if cpu and args.quick else [4096, 5120] if not cpu else [256]
    if args.block_tokens is None:
        args.block_tokens = 64 if cpu and args.quick else 4096
    if not cpu and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible; use --device cpu --quick for a smoke run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The backward-only timing replays one autograd graph (retain_graph=True); compiled backwards that
    # donate saved buffers refuse that. Donation only saves memory, so switch it off for the benchmark.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    timer = make_timer(device, args.quick)
    meta = environment(device)
    meta["copy_bw_gbps"] = copy_bandwidth(device, timer, args.quick)
    meta["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"{meta['device']} | torch {meta['torch']} triton {meta['triton']} cuda {meta['cuda']} | "
          f"commit {meta['git_commit']} | copy bandwidth {meta['copy_bw_gbps']:.0f} GB/s", flush=True)  # fmt: skip
    if "note" in meta:
        print(f"*** {meta['note']} ***", flush=True)
    write_json(args.out / "meta.json", meta)  # early, so a run cut short still says what it was
    block_rows = run_block(args, device, timer, meta, args.out) if args.block_d else []
    rows = run_mix(args, device, timer, meta["copy_bw_gbps"], meta, args.out)
    meta["targets"] = target_checks(rows, block_rows, args.dtype) if device.type == "cuda" else []
    if rows:
        plot(rows, meta, args.out / "mix.png")
    write_json(args.out / "meta.json", meta)
    for c in meta["targets"]:
        print(f"target {'MET    ' if c['met'] else 'NOT MET'} {c['target']}: {c['value']:.3f}")
    print(
        f"wrote {args.out}/mix.csv, block.csv, meta.json, mix.png" + (f"  ({meta['note']})" if "note" in meta else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
