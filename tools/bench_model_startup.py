#!/usr/bin/env python
"""Model start-up benchmark (docs/BENCHMARKS.md, section "Model start-up"): what building the engine costs
each rank in host memory and in bytes read from the HF checkpoint.

    python tools/bench_model_startup.py write  --out /tmp/bench_llama        # synthetic HF Llama, ~1.6 GB fp32
    python tools/bench_model_startup.py run    --model /tmp/bench_llama --mode pipeline --nproc 2
    python tools/bench_model_startup.py run    --model /tmp/bench_llama --mode zero3 --nproc 2
    python tools/bench_model_startup.py all    --model /tmp/bench_llama      # P=2, P=4 pipeline; ZeRO-3 on 2

``run`` launches ``deepspeed --num_gpus N`` on this file (``worker``): each rank builds the real engine
(``mks2.training.engine.build_engine``) of a stage-1 run whose base is the synthetic checkpoint
(``model.init_from``; demo data and demo vision tower), and prints, per rank: peak RSS over the process's
life (``ru_maxrss``, so imports and the runtime are included), and the ``/proc/self/io`` counters
``rchar`` (bytes read through read()/pread(): our safetensors reader) and ``read_bytes`` (bytes the
storage layer fetched for it, page-cache misses only) over ``build_engine``, plus the bytes of
HF-checkpoint tensors handed to the model (counted by wrapping the reader: mmap'ed reads, as through
``safetensors.safe_open``, appear in neither ``/proc`` counter).

The script runs on any checkout (also the commit before stage-local loading), so before/after figures
come from the same code path. RAM-heavy: check ``free -g`` first; the ranks of one run share the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ~400M parameters, 1.6 GB in fp32: 26 layers spread 13/13 over 2 stages, 7/7/6/6 over 4.
ARCH = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=26, num_heads=16, num_kv_heads=16)


def write_checkpoint(out: Path) -> int:
    """A transformers-style Llama directory (config.json + one model.safetensors) of ``ARCH``; returns bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    a = ARCH
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": a["vocab_size"],
        "hidden_size": a["hidden_size"], "intermediate_size": a["intermediate_size"],
        "num_hidden_layers": a["num_layers"], "num_attention_heads": a["num_heads"],
        "num_key_value_heads": a["num_kv_heads"], "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(0)
    d, f, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    state = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": torch.ones(d), "lm_head.weight": w(v, d)}
    for i in range(a["num_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
            p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
        }  # fmt: skip
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return (out / "model.safetensors").stat().st_size


def _proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as fh:
        for line in fh:
            key, value = line.split(":")
            out[key.strip()] = int(value)
    return out


def _count_tensor_bytes() -> list[int]:
    """Wrap the HF readers so every tensor handed out is counted (bytes), whichever reader the checkout has."""
    counter = [0]
    import safetensors

    original = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self._inner = original(*a, **k)

        def __enter__(self):
            self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name):
            t = self._inner.get_tensor(name)
            counter[0] += t.numel() * t.element_size()
            return t

        def __getattr__(self, name):
            return getattr(self._inner, name)

    safetensors.safe_open = Counting
    from mks2.model import hf_loading

    reader = getattr(hf_loading, "read_safetensors_into", None)
    if reader is not None:  # stage-local loading: tensors read with pread straight into the parameters

        def counted(file, entry, out):
            counter[0] += entry.nbytes
            return reader(file, entry, out)

        hf_loading.read_safetensors_into = counted
    return counter


def worker(args) -> None:
    import torch

    from mks2.config import load_config
    from mks2.demo import resolve
    from mks2.training import distributed
    from mks2.training.engine import build_engine
    from mks2.training.stage1 import Stage1Task

    torch.set_num_threads(1)
    counted = _count_tensor_bytes()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    over = [
        f"model.init_from={args.model}", "model.mvm.layers=every:7", "train.micro_batch_size=1",
        f"train.global_batch_size={world if args.mode == 'zero3' else 1}", "train.precision=fp32",
        "train.eval_interval=-1", "data.num_workers=0", f"train.save_dir={args.save_dir}", "train.max_steps=1",
        f"parallel.mode={args.mode}",
    ]  # fmt: skip
    if args.mode == "pipeline":
        over.append(f"parallel.pipeline_stages={world}")
    cfg = resolve(load_config(None, over))
    distributed.init_distributed()
    task = Stage1Task(cfg)
    io0, t0 = _proc_io(), time.perf_counter()
    built = build_engine(cfg, task)
    seconds = time.perf_counter() - t0
    io1 = _proc_io()
    out = {
        "rank": distributed.rank(),
        "stage": built.pp_stage,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rchar": io1["rchar"] - io0["rchar"],
        "read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "hf_tensor_bytes": counted[0],
        "build_s": seconds,
    }
    print("STARTUP_RESULT " + json.dumps(out), flush=True)
    distributed.barrier()


def run(model: Path, mode: str, nproc: int, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), __file__, "worker",
               "--model", str(model), "--mode", mode, "--save-dir", tmp]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    found = re.findall(r"STARTUP_RESULT (\{.*?\})", proc.stdout)  # ranks' lines may interleave
    if proc.returncode != 0 or len(found) != nproc:
        raise SystemExit(f"{mode} run on {nproc} ranks failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return sorted((json.loads(text) for text in found), key=lambda r: r["rank"])


def table(model: Path, cases: list[tuple[str, int]], port: int) -> str:
    size = (model / "model.safetensors").stat().st_size
    gib = 2**30
    rows = [
        f"checkout {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()}"  # noqa: E501
        f", {platform.machine()}, {os.cpu_count()} cores; checkpoint {size / gib:.2f} GiB fp32",
        "",
        "| run | rank | stage | peak RSS GiB | HF tensor bytes read | rchar | read_bytes | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (mode, n) in enumerate(cases):
        for r in run(model, mode, n, port + i):
            rows.append(
                f"| {mode} x{n} | {r['rank']} | {r['stage']} | {r['peak_rss_bytes'] / gib:.2f} | "
                f"{r['hf_tensor_bytes'] / size:.1%} | {r['rchar'] / size:.1%} | {r['read_bytes'] / size:.1%} | "
                f"{r['build_s']:.1f} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["write", "run", "all", "worker"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_llama"))
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench_llama"))
    parser.add_argument("--mode", choices=["pipeline", "zero3"], default="pipeline")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--port", type=int, default=29810)
    parser.add_argument("--save-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == "write":
        print(f"wrote {args.out}: {write_checkpoint(args.out) / 2**30:.2f} GiB")
    elif args.what == "worker":
        worker(args)
    elif args.what == "run":
        print(table(args.model, [(args.mode, args.nproc)], args.port))
    else:
        print(table(args.model, [("pipeline", 2), ("pipeline", 4), ("zero3", 2)], args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
