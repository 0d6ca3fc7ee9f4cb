"""GPU smoke test: what an operator runs on one GPU node before a large job (no network needed).

    python tools/gpu_smoke.py                 # every check on this node's GPUs (mks2 gpu-smoke, the same)
    python tools/gpu_smoke.py --no-train      # skip the two short DeepSpeed runs
    python tools/gpu_smoke.py --cpu           # the CPU-checkable parts (gloo instead of NCCL, fp32, no runs)

Checks, each printed as PASS/FAIL with its figures:

1. ``collectives``: one process per local GPU (spawned here; under torchrun, the launched ranks) inits
   NCCL and runs all_reduce / all_gather / broadcast on GPU tensors, results checked on every rank.
2. ``llama-parity``: our base model (``mks2.model``) against ``transformers.LlamaForCausalLM`` with the same
   random weights on a small but realistic shape (hidden 2048, GQA 16/8 heads, 4 layers, vocab 32000, 1024
   tokens): bf16 logits and the embedding gradient of a causal-LM loss, each compared with an fp32 run of
   transformers; ours must be no further from it than transformers' own bf16 run (x1.5 + a small floor).
3. ``attention``: which kernel ``model.attention=auto`` picks (flash-attn, or the SDPA fallback and why) and,
   on padded + packed rows, flash-attn's varlen path against SDPA with the boolean mask (or SDPA vs eager).
4. ``mome-op``: the fused soft-MoME mixing op (``kernels/``, Triton on CUDA) against its PyTorch reference,
   forward and the three gradients, bf16 and fp32.
5. ``train``: when DeepSpeed is importable, 3 steps of stage 1 then 3 of stage 2 on the demo world widened to
   hidden 2048 (4 layers, bf16, activation checkpointing) on all local GPUs; prints tokens/s from
   metrics.jsonl and the peak GPU memory ``nvidia-smi`` saw (whole device, CUDA context included).

Exit status: 0 when every check passed, 1 when one failed, 2 when there is no GPU (without ``--cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_GPU = 2


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------------
# 1. collectives
# ---------------------------------------------------------------------------------------------------


def _collective_worker(rank: int, world: int, backend: str, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        x = torch.full((1024,), float(rank + 1), device=dev)
        dist.all_reduce(x)
        ok = bool((x == world * (world + 1) / 2).all())
        parts = [torch.empty(4, device=dev) for _ in range(world)]
        dist.all_gather(parts, torch.full((4,), float(rank), device=dev))
        ok &= all(bool((p == r).all()) for r, p in enumerate(parts))
        b = torch.full((8,), float(rank), device=dev)
        dist.broadcast(b, src=0)
        ok &= bool((b == 0).all())
        dist.barrier()
        Path(out, f"rank{rank}").write_text("ok" if ok else "wrong result")
    finally:
        dist.destroy_process_group()


def check_collectives(cpu: bool) -> str:
    torch = _torch()
    import torch.multiprocessing as mp

    backend = "gloo" if cpu else "nccl"
    world = 2 if cpu else torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as d:
        init = f"file://{d}/store"
        t0 = time.monotonic()
        mp.spawn(_collective_worker, args=(world, backend, init, d), nprocs=world, join=True)
        results = [Path(d, f"rank{r}").read_text() for r in range(world)]
    if any(r != "ok" for r in results):
        raise AssertionError(f"{backend}: {results}")
    return f"{backend}, {world} ranks: all_reduce, all_gather, broadcast correct ({time.monotonic() - t0:.1f} s)"


# ---------------------------------------------------------------------------------------------------
# 2. parity with transformers' Llama
# ---------------------------------------------------------------------------------------------------

GPU_SHAPE = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 4, "num_attention_heads": 16,
             "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}  # fmt: skip
CPU_SHAPE = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 256}  # fmt: skip


def _hf_and_ours(shape: dict, directory: Path, attention: str):
    """transformers' Llama with random weights saved to ``directory`` and our model loaded from it (fp32, CPU)."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    from mks2.config import load_config
    from mks2.model.build import build_model

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False))
    hf.save_pretrained(directory)
    cfg = load_config(
        None, ["model.stage=base", f"model.init_from={directory}", "model.vision.kind=none", "data.seq_len=128",
               f"model.attention={attention}", "model.lora.dropout=0.0"],
    )  # fmt: skip
    ours = build_model(cfg)
    return hf.eval(), ours.eval()


def _logits_and_embed_grad(model, ids, embed) -> tuple:
    torch = _torch()
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(ids).logits  # [B, S, V]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach().float(), embed.grad.detach().float().clone(), torch.as_tensor(loss.item())


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_parity(cpu: bool) -> str:
    torch = _torch()

    dev = torch.device("cpu" if cpu else "cuda")
    shape, batch, seq = (CPU_SHAPE, 2, 64) if cpu else (GPU_SHAPE, 2, 1024)
    with tempfile.TemporaryDirectory() as d:
        hf, ours = _hf_and_ours(shape, Path(d), "auto")
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(dev)
    hf.to(dev, torch.float32)
    ref_logits, ref_grad, _ = _logits_and_embed_grad(hf, ids, hf.model.embed_tokens.weight)
    if cpu:  # fp32 on both sides: they must agree to rounding
        ours.to(dev, torch.float32)
        logits, grad, _ = _logits_and_embed_grad(ours, ids, ours.model.embed_tokens.weight)
        el, eg = _rel(logits, ref_logits), _rel(grad, ref_grad)
        if el > 1e-5 or eg > 1e-4:
            raise AssertionError(f"fp32 relative error: logits {el:.2e}, embedding grad {eg:.2e}")
        return f"fp32 {batch}x{seq} tokens, hidden {shape['hidden_size']}: logits {el:.1e}, embedding grad {eg:.1e}"
    hf.to(dev, torch.bfloat16)
    hf_logits, hf_grad, _ = _logits_and_embed_grad(hf, ids, hf.model.embed_tokens.weight)
    ours.to(dev, torch.bfloat16)
    logits, grad, _ = _logits_and_embed_grad(ours, ids, ours.model.embed_tokens.weight)
    out = []
    for what, mine, theirs, ref in (("logits", logits, hf_logits, ref_logits), ("embed grad", grad, hf_grad, ref_grad)):
        e_ours, e_hf = _rel(mine, ref), _rel(theirs, ref)
        if e_ours > 1.5 * e_hf + 2e-3:
            raise AssertionError(f"bf16 {what}: ours {e_ours:.2e} from fp32 transformers, transformers bf16 {e_hf:.2e}")
        out.append(f"{what} {e_ours:.1e} (transformers bf16 {e_hf:.1e})")
    return f"bf16 {batch}x{seq} tokens, hidden {shape['hidden_size']}, vs fp32 transformers: " + ", ".join(out)


# ---------------------------------------------------------------------------------------------------
# 3. attention backend
# ---------------------------------------------------------------------------------------------------


def check_attention(cpu: bool) -> str:
    torch = _torch()
    from mks2.model.attention import attention_kernel, build_attention_context, flash_available, resolve_backend
    from mks2.model.rope import RotaryEmbedding

    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    picked = resolve_backend("auto", dev, dtype)
    b, s, h, hkv, hd = 2, 256, 16, 8, 128
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, s, n, hd, generator=gen).to(dev, dtype) for n in (h, hkv, hkv))
    seg = torch.ones(b, s, dtype=torch.long)
    seg[0, 100:] = 2  # row 0: two packed documents
    seg[1, 200:] = 0  # row 1: padding
    pos = torch.cat([torch.arange(100), torch.arange(s - 100)]).repeat(b, 1)
    rotary = RotaryEmbedding(head_dim=hd, theta=10000.0, max_position_embeddings=4096)
    seg, pos = seg.to(dev), pos.to(dev)
    ref_kind = "sdpa" if picked == "flash" else "eager"
    outs = {}
    for kind in (picked, ref_kind):
        ctx = build_attention_context(position_ids=pos, segment_ids=seg, rotary=rotary, dtype=dtype, backend=kind)
        outs[kind] = attention_kernel(q, k, v, ctx).float() * (seg > 0)[..., None, None]  # padding rows ignored
    err = float((outs[picked] - outs[ref_kind]).abs().max())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if err > tol:
        raise AssertionError(f"{picked} vs {ref_kind} on packed + padded rows: max error {err:.2e} > {tol:g}")
    note = "" if picked == "flash" or cpu else f" (flash-attn importable: {flash_available()})"
    return f"model.attention=auto picks {picked}{note}; {picked} vs {ref_kind}, packed + padded: max error {err:.1e}"


# ---------------------------------------------------------------------------------------------------
# 4. fused MoME op
# ---------------------------------------------------------------------------------------------------


def check_mome_op(cpu: bool) -> str:
    torch = _torch()
    from mks2_kernels.op import resolve_backend
    from mks2_kernels.reference import mix_autograd

    from mks2.ops import mome_mix

    dev = torch.device("cpu" if cpu else "cuda")
    backend = resolve_backend("auto", dev)
    out = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(4, 512, 2048, generator=gen).to(dev, dtype).requires_grad_()
        w = (0.02 * torch.randn(2, 2048, generator=gen)).to(dev, dtype).requires_grad_()
        y = torch.randn(2, 4, 512, 2048, generator=gen).to(dev, dtype).requires_grad_()
        dout = torch.randn(4, 512, 2048, generator=gen).to(dev, dtype)
        results = []
        for fused in (True, False):
            o = mome_mix(x, w, y, backend="auto") if fused else mix_autograd(x, w, y)
            grads = torch.autograd.grad(o, (x, w, y), dout)
            results.append([o.detach().float(), *(g.float() for g in grads)])
        errs = [_rel(a, b) for a, b in zip(*results)]
        if max(errs) > tol:
            raise AssertionError(f"{backend} {dtype}: relative errors out/dx/dw/dy {errs} > {tol:g}")
        out.append(f"{str(dtype).replace('torch.', '')} max rel. error {max(errs):.1e}")
    return f"backend {backend}: " + ", ".join(out)


# ---------------------------------------------------------------------------------------------------
# 5. two short DeepSpeed runs
# ---------------------------------------------------------------------------------------------------

WIDE = ["model.hidden_size=2048", "model.intermediate_size=5504", "model.num_heads=16", "model.num_kv_heads=8",
        "model.num_layers=4", "train.precision=bf16", "train.activation_checkpointing=true", "train.max_steps=3",
        "train.warmup_steps=1", "train.save_interval=0", "train.eval_interval=-1", "data.num_workers=2"]  # fmt: skip


class _MemoryPoll:
    """Peak ``memory.used`` over all local GPUs as nvidia-smi reports it, polled every 0.5 s."""

    def __init__(self) -> None:
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout  # fmt: skip
                self.peak_mib = max([self.peak_mib, *(int(v) for v in out.split() if v.strip().isdigit())])
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> _MemoryPoll:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _train_once(script: str, config: str, args: list[str], nproc: int, save_dir: Path, timeout: float) -> str:
    from mks2.config import bundled_config

    launcher = REPO / "launch" / script
    if not launcher.is_file():
        raise AssertionError(f"{launcher} not found: run tools/gpu_smoke.py from a repository checkout")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(launcher), "--config", str(bundled_config(config)), *args, f"train.save_dir={save_dir}"]  # fmt: skip
    with _MemoryPoll() as mem:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    recs = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "tokens_per_s" in r]
    tok_s = steps[-1]["tokens_per_s"] if steps else float("nan")
    return (
        f"{script}: {len(steps)} steps in {time.monotonic() - t0:.0f} s, last step {tok_s:,.0f} tokens/s, "
        f"peak GPU memory {mem.peak_mib / 1024:.1f} GiB (nvidia-smi, whole device)"
    )


def check_train(cpu: bool, timeout: float) -> str:
    torch = _torch()
    nproc = 1 if cpu else torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as d:
        s1, s2 = Path(d, "stage1"), Path(d, "stage2")
        micro = ["train.micro_batch_size=4", f"train.global_batch_size={4 * nproc}"]
        first = _train_once("pretrain_mvm.py", "demo.yaml", [*WIDE, *micro], nproc, s1, timeout)
        stage2 = [a for a in WIDE if not a.startswith("model.")]  # the architecture comes from stage 1
        second = _train_once(
            "finetune_mome.py", "demo_stage2.yaml", [*stage2, *micro, f"model.init_from_stage1={s1}"], nproc, s2,
            timeout,
        )  # fmt: skip
    return first + "; " + second


# ---------------------------------------------------------------------------------------------------


def _run(name: str, fn: Callable[[], str]) -> bool:
    t0 = time.monotonic()
    try:
        detail = fn()
    except Exception as exc:  # a failed check is reported and the others still run
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
        if os.environ.get("MKS2_SMOKE_TRACEBACK"):
            traceback.print_exc()
        return False
    print(f"PASS {name} ({time.monotonic() - t0:.1f} s): {detail}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="GPU smoke test of one node before a large job (no network).")
    ap.add_argument("--cpu", action="store_true", help="run the CPU-checkable parts (gloo, fp32; no training runs)")
    ap.add_argument("--no-train", action="store_true", help="skip the two short DeepSpeed runs")
    ap.add_argument("--train-timeout", type=float, default=900.0, help="seconds per training run")
    ap.add_argument("--only", nargs="+", choices=["collectives", "llama-parity", "attention", "mome-op", "train"])
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: nothing here downloads
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    torch = _torch()
    if not args.cpu and not torch.cuda.is_available():
        print(
            "no GPU: torch.cuda.is_available() is False (torch " + torch.__version__ + ", CUDA build: "
            f"{torch.version.cuda or 'none'}); nothing was checked. Run on a GPU node, or with --cpu for the "
            "parts a CPU can check.",
            file=sys.stderr,
        )
        return NO_GPU
    if not args.cpu:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"devices: {torch.cuda.device_count()} x [{names}], torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"--cpu: gloo and fp32 on the CPU, torch {torch.__version__} (no GPU check ran)")
    checks: dict[str, Callable[[], str]] = {
        "collectives": lambda: check_collectives(args.cpu),
        "llama-parity": lambda: check_parity(args.cpu),
        "attention": lambda: check_attention(args.cpu),
        "mome-op": lambda: check_mome_op(args.cpu),
    }
    try:
        import deepspeed  # noqa: F401

        has_ds = True
    except Exception:
        has_ds = False
    if not args.no_train and not args.cpu and has_ds:
        checks["train"] = lambda: check_train(args.cpu, args.train_timeout)
    elif not args.cpu and not args.no_train:
        print("SKIP train: DeepSpeed is not importable")
    if args.only:
        checks = {k: v for k, v in checks.items() if k in args.only}
    ok = [_run(name, fn) for name, fn in checks.items()]
    print(f"{sum(ok)}/{len(ok)} checks passed")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
