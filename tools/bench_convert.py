#!/usr/bin/env python
"""Benchmark checkpoint conversion: peak RSS and wall time of ``tools/convert_to_hf.py`` against
DeepSpeed's ``zero_to_fp32`` writing the same ZeRO-3 checkpoint to safetensors.

    python tools/bench_convert.py --workdir /tmp/bench_convert            # ~600M parameters, ~4 GB checkpoint
    python tools/bench_convert.py --workdir /tmp/bench_convert --hidden 512 --layers 8   # a quick small run

1. Trains the stage-1 demo model, scaled up (``--hidden``/``--layers``/``--vocab``), for one step on 2 CPU
   ranks with the real ``deepspeed`` launcher and ZeRO-3 (skipped when ``--workdir`` already holds it).
2. Runs each converter in a fresh child process and reads the child's peak resident set size
   (``ru_maxrss`` from ``wait4``: anonymous memory plus the pages of memory-mapped files it touched):
   - ``ours``: ``tools/convert_to_hf.py --no-verify --dtype fp32`` (streaming, the number the target is about);
   - ``ours + verify``: the same with the default verification (loads our model and the export once each);
   - ``deepspeed``: ``convert_zero_checkpoint_to_state_dict(..., safe_serialization=True)`` (lazy mode).
3. Checks the two outputs hold identical tensors, then prints a Markdown table and a JSON line.

Target (issue #6): peak RSS of ``ours`` <= 3 x largest tensor + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def run_measured(cmd: list[str], *, cwd: Path, log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in bytes, exit code) of one child process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"}
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, code  # ru_maxrss is in KiB on Linux


def train_checkpoint(args: argparse.Namespace, save_dir: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [
        f"model.vocab_size={args.vocab}",
        f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.intermediate}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.hidden // 64}",
        f"model.num_kv_heads={args.hidden // 64}",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.max_steps=1",
        "train.save_interval=0",
        "train.warmup_steps=1",
        "train.precision=fp32",
        "train.eval_interval=-1",
        "data.num_workers=0",
        "data.seq_len=64",
        f"data.cache_dir={args.workdir / 'cache'}",
        f"train.save_dir={save_dir}",
    ]
    cmd = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(REPO / "launch" / "pretrain_mvm.py"),
        *overrides,
    ]
    print("training one step to create the checkpoint:", " ".join(cmd), flush=True)
    wall, rss, code = run_measured(cmd, cwd=REPO, log=args.workdir / "train.log")
    if code != 0:
        sys.exit(f"training failed (exit {code}); see {args.workdir / 'train.log'}")
    print(f"  trained and saved in {wall:.0f} s", flush=True)


def checkpoint_facts(save_dir: Path) -> dict:
    from mks2.checkpoint import open_consolidated

    with open_consolidated(save_dir) as ckpt:
        ckpt_dir = ckpt.checkpoint.path
        numel = sum(m.nbytes // m.dtype.itemsize if hasattr(m.dtype, "itemsize") else 0 for m in ckpt.meta.values())
        largest = max(m.nbytes for m in ckpt.meta.values())
        largest_name = max(ckpt.meta, key=lambda n: ckpt.meta[n].nbytes)
    files = [p for p in ckpt_dir.rglob("*") if p.is_file()]
    return {
        "checkpoint": str(ckpt_dir),
        "checkpoint_bytes": sum(p.stat().st_size for p in files),
        "parameters": numel,
        "largest_tensor": largest_name,
        "largest_tensor_bytes": largest,
    }


def compare_outputs(ours: Path, theirs: Path) -> int:
    """Number of tensors compared (raises on the first difference); one tensor in memory at a time."""
    from safetensors import safe_open

    def index(directory: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as r:
                out.update({k: f for k in r.keys()})
        return out

    a, b = index(ours), index(theirs)
    mapped = {k.removeprefix("model."): k for k in b}  # DeepSpeed keeps the training objective's prefix
    if set(a) != set(mapped):
        raise SystemExit(f"tensor names differ: {sorted(set(a) ^ set(mapped))[:5]}")
    import torch

    for name, file in a.items():
        with safe_open(str(file), "pt") as ra, safe_open(str(b[mapped[name]]), "pt") as rb:
            if not torch.equal(ra.get_tensor(name), rb.get_tensor(mapped[name])):
                raise SystemExit(f"tensor {name} differs between the two conversions")
    return len(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--skip-verify", action="store_true", help="do not measure the run with verification")
    p.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = p.parse_args()
    args.workdir = args.workdir.absolute()
    args.workdir.mkdir(parents=True, exist_ok=True)
    save_dir = args.workdir / "run"
    if not (save_dir / "latest").is_file():
        train_checkpoint(args, save_dir)
    facts = checkpoint_facts(save_dir)
    print(json.dumps(facts), flush=True)

    tag = Path(facts["checkpoint"]).name
    out_ours, out_ds, out_verify = (args.workdir / n for n in ("hf_ours", "hf_deepspeed", "hf_verified"))
    convert = [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(save_dir), "--quiet",
               "--dtype", "fp32", "--force"]  # fmt: skip
    deepspeed_cmd = [sys.executable, "-c", (
        "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict as c; "
        f"c({str(save_dir)!r}, {str(out_ds)!r}, safe_serialization=True, tag={tag!r})"
    )]  # fmt: skip
    runs = {
        "ours": convert + ["--output", str(out_ours), "--no-verify"],
        "deepspeed zero_to_fp32": deepspeed_cmd,
    }
    if not args.skip_verify:
        runs["ours + verify"] = convert + ["--output", str(out_verify)]
    results = {}
    for name, cmd in runs.items():
        wall, rss, code = run_measured(cmd, cwd=args.workdir, log=args.workdir / f"{name.split()[0]}.log")
        if code != 0:
            sys.exit(f"{name} failed (exit {code}); see the log in {args.workdir}")
        results[name] = {"seconds": round(wall, 1), "peak_rss_bytes": rss}
        print(f"  {name}: {wall:.1f} s, peak RSS {rss / GIB:.2f} GiB", flush=True)
    compared = compare_outputs(out_ours, out_ds)

    largest = facts["largest_tensor_bytes"]
    target = 3 * largest + GIB
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, torch {__import__('torch').__version__}"
    print()
    size, params = facts["checkpoint_bytes"] / GIB, facts["parameters"] / 1e6
    print(f"checkpoint: {size:.2f} GiB on disk, {params:.0f}M parameters, largest tensor {facts['largest_tensor']} "
          f"{largest / 2**20:.0f} MiB (fp32); machine: {machine}")  # fmt: skip
    print(
        f"target for ours: peak RSS <= 3 x largest + 1 GiB = {target / GIB:.2f} GiB; "
        f"outputs identical ({compared} tensors)"
    )
    print()
    print("| converter | wall time | peak RSS |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} s | {r['peak_rss_bytes'] / GIB:.2f} GiB |")
    print(json.dumps({**facts, "target_bytes": target, "results": results, "machine": machine}))
    if not args.keep:
        import shutil

        for d in (out_ours, out_ds, out_verify):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
