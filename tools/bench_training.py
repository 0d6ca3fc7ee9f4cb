#!/usr/bin/env python
"""Training benchmarks (docs/BENCHMARKS.md, section "Stage-1 training").

    python tools/bench_training.py speed    # our `base` model vs transformers.LlamaForCausalLM, fwd+bwd
    python tools/bench_training.py stage1   # stage-1 step (both views, MVM trainable) over a base step
    python tools/bench_training.py memory   # ZeRO-3 peak RSS and trainable state per rank, 1 vs 2 ranks

``speed`` and ``stage1`` run in this process (no DeepSpeed: they time the model's compute); the
repetitions of the two sides are interleaved so load from other jobs hits both alike, and the median
is reported. ``memory`` launches ``deepspeed --num_gpus N`` on this very file (``memory-worker``):
each rank builds the real engine (``mks2.training.engine``) on a ~340M-parameter stage-1 config, runs
two optimizer steps on the demo data and reports its peak RSS and the bytes of its trainable state
(fp32 master partition + gradient partition + Adam moments) as DeepSpeed holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# ~58M-parameter Llama for the speed comparison (DESIGN §5: a 134M one takes ~6 s per 4x256 step here).
SPEED_ARCH = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=8)
# ~340M-parameter stage-1 model on the demo vocabulary for the ZeRO-3 memory comparison.
MEMORY_ARCH = dict(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=16)


def _median_times(fns: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time and median process CPU time of each function; repetitions interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {k: statistics.median(v) for k, v in wall.items()}
    out |= {f"{k}_cpu": statistics.median(v) for k, v in cpu.items()}
    return out


def _overrides(arch: dict, extra: list[str] = ()) -> list[str]:
    return [f"model.{k}={v}" for k, v in arch.items()] + list(extra)


# --------------------------------------------------------------------------------------------
# speed: ours vs transformers on the same weights and batch
# --------------------------------------------------------------------------------------------


def bench_speed(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mks2 import build_model, load_config

    a = SPEED_ARCH
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=a["vocab_size"],
        hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_layers"],
        num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_kv_heads"],
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    hf = LlamaForCausalLM(hf_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        cfg = load_config(
            None,
            [f"model.init_from={tmp}", "model.stage=base", "model.vision.kind=none", "model.vision.path=null",
             "model.attention=sdpa", f"data.seq_len={args.seq}"],
        )  # fmt: skip
        ours = build_model(cfg)
    hf.train(), ours.train()
    ids = torch.randint(0, a["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step(model, is_hf):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach()

    l_ours, l_hf = step(ours, False), step(hf, True)
    assert torch.allclose(l_ours, l_hf, rtol=1e-4), (l_ours, l_hf)  # same weights, same function
    t = _median_times({"ours": lambda: step(ours, False), "hf": lambda: step(hf, True)}, args.repeats, 1)
    tokens = args.batch * args.seq
    params = sum(p.numel() for p in ours.parameters())
    return {
        "params": params,
        "batch": f"{args.batch}x{args.seq}",
        "threads": torch.get_num_threads(),
        "ours_s": t["ours"],
        "hf_s": t["hf"],
        "ratio": t["ours"] / t["hf"],
        "ours_cpu_s": t["ours_cpu"],
        "hf_cpu_s": t["hf_cpu"],
        "cpu_ratio": t["ours_cpu"] / t["hf_cpu"],
        "ours_tok_s": tokens / t["ours"],
        "hf_tok_s": tokens / t["hf"],
        "loss_ours": float(l_ours),
        "loss_hf": float(l_hf),
    }


# --------------------------------------------------------------------------------------------
# stage1: the stage-1 objective step over a base step on the same captions
# --------------------------------------------------------------------------------------------


def bench_stage1(args) -> dict:
    from mks2 import build_model, load_config
    from mks2.demo import resolve
    from mks2.training.frozen_vision import FrozenVision
    from mks2.training.stage1 import Stage1Task

    arch = _overrides(SPEED_ARCH | {"vocab_size": 1024}, ["model.attention=sdpa", f"data.seq_len={args.seq}"])
    cfg1 = resolve(load_config(None, arch + ["train.precision=fp32"]))
    torch.manual_seed(0)
    stage1 = build_model(cfg1)
    vision = FrozenVision.build(cfg1.model, torch.device("cpu"))
    task = Stage1Task(cfg1)
    task.dp_group = None
    objective = task.objective(stage1)
    cfg0 = load_config(None, arch + ["model.stage=base", "model.vision.kind=none", "model.vision.path=null"])
    base = build_model(cfg0)

    # A caption batch as the collator makes it: P placeholders + caption, padded to seq; retrieval view.
    p = vision.num_prefix_tokens
    b, s, cap = args.batch, args.seq, args.seq - p - 8
    g = torch.Generator().manual_seed(2)
    text = torch.randint(4, 1024, (b, cap), generator=g)
    ids = torch.zeros(b, s, dtype=torch.long)
    ids[:, :p] = cfg1.model.vision.image_token_id
    ids[:, p : p + cap] = text
    seg = torch.zeros(b, s, dtype=torch.int32)
    seg[:, : p + cap] = 1
    labels = torch.full((b, s), -100)
    labels[:, p : p + cap] = text
    r = s - p + 1
    ret_ids = torch.zeros(b, r, dtype=torch.long)
    ret_ids[:, :cap] = text
    ret_seg = torch.zeros(b, r, dtype=torch.int32)
    ret_seg[:, :cap] = 1
    pos = torch.arange(s).expand(b, s) * (seg != 0)
    ret_pos = torch.arange(r).expand(b, r) * (ret_seg != 0)
    batch = {
        "input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg,
        "pixel_values": torch.randn(b, 3, vision.front_end.info.image_size, vision.front_end.info.image_size),
        "ret_input_ids": ret_ids, "ret_position_ids": ret_pos, "ret_segment_ids": ret_seg,
        "ret_eos_index": torch.full((b,), cap - 1),
    }  # fmt: skip
    base_ids = ids.masked_fill(ids < 0, 5)  # base: the same caption rows as plain tokens

    def step_stage1():
        objective.zero_grad(set_to_none=True)
        objective(**task.prepare(batch, vision, torch.device("cpu"))).backward()

    def step_base():
        base.zero_grad(set_to_none=True)
        base(input_ids=base_ids, labels=labels, segment_ids=seg, position_ids=pos).loss.backward()

    t = _median_times({"stage1": step_stage1, "base": step_base}, args.repeats, 1)
    return {
        "batch": f"{b}x{s} captions (+{b}x{r} retrieval rows)",
        "threads": torch.get_num_threads(),
        "stage1_s": t["stage1"],
        "base_s": t["base"],
        "ratio": t["stage1"] / t["base"],
        "cpu_ratio": t["stage1_cpu"] / t["base_cpu"],
    }


# --------------------------------------------------------------------------------------------
# memory: ZeRO-3 with 1 vs 2 ranks (real engine, real launcher)
# --------------------------------------------------------------------------------------------


def _trainable_state_bytes(engine) -> dict:
    """Bytes this rank holds for the trainable parameters' optimizer state, as DeepSpeed allocated it."""
    opt = engine.optimizer
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "fp32_partitioned_groups_flat", []))
    grads = getattr(opt, "grad_partitions_flat_buffer", None)
    grad_bytes = grads.numel() * grads.element_size() if grads is not None else 0
    moments = sum(
        v.numel() * v.element_size()
        for state in opt.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return {"master_bytes": master, "grad_bytes": grad_bytes, "adam_bytes": moments}


def memory_worker(args) -> None:
    from mks2.config import load_config
    from mks2.demo import resolve
    from mks2.training import distributed
    from mks2.training.engine import build_engine
    from mks2.training.loop import Trainer
    from mks2.training.stage1 import Stage1Task

    over = _overrides(MEMORY_ARCH) + [
        "train.micro_batch_size=1", f"train.global_batch_size={args.nproc}", "train.precision=fp32",
        "train.eval_interval=-1", "data.num_workers=0", f"train.save_dir={args.save_dir}", "train.max_steps=2",
    ]  # fmt: skip
    cfg = resolve(load_config(None, over))
    distributed.init_distributed()
    task = Stage1Task(cfg)
    built = build_engine(cfg, task)
    trainer = Trainer(cfg, task, built)
    trainer.resume(None)
    built.engine.train()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    state = _trainable_state_bytes(built.engine)
    out = {
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "llm_params": built.llm_params,
        "trainable_params": built.trainable_params,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": times[-1],
        **state,
    }
    print("MEMORY_RESULT " + json.dumps(out), flush=True)


def bench_memory(args) -> dict:
    results = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(29700 + n), __file__, "memory-worker",
                   "--nproc", str(n), "--save-dir", tmp]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if "MEMORY_RESULT " in ln]
            if proc.returncode != 0 or len(lines) != n:
                raise SystemExit(f"memory run with {n} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            ranks = [json.loads(ln.split("MEMORY_RESULT ", 1)[1]) for ln in lines]
            results[n] = ranks
    one, two = results[1][0], results[2]

    def state(r):
        return r["master_bytes"] + r["grad_bytes"] + r["adam_bytes"]

    return {
        "llm_params": one["llm_params"],
        "trainable_params": one["trainable_params"],
        "1_rank": {"peak_rss_gib": one["peak_rss_bytes"] / 2**30, "trainable_state_gib": state(one) / 2**30},
        "2_ranks": [
            {"rank": r["rank"], "peak_rss_gib": r["peak_rss_bytes"] / 2**30, "trainable_state_gib": state(r) / 2**30}
            for r in sorted(two, key=lambda r: r["rank"])
        ],
        "trainable_state_ratio": max(state(r) for r in two) / state(one),
        "peak_rss_ratio": max(r["peak_rss_bytes"] for r in two) / one["peak_rss_bytes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "stage1", "memory", "memory-worker"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.what == "memory-worker":
        memory_worker(args)
        return 0
    result = {"speed": bench_speed, "stage1": bench_stage1, "memory": bench_memory}[args.what](args)
    print(json.dumps({"benchmark": args.what, "torch": torch.__version__, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
