#!/usr/bin/env python
"""Benchmark greedy ``generate()`` of exported MKS2 models against ``LlamaForCausalLM`` of the same shape.

    python tools/bench_generate.py                          # the demo shape (hidden 64, 4 layers, vocab 1024)
    python tools/bench_generate.py --hidden 256 --layers 8 --intermediate 704 --vocab 8192 --repeats 2

1. Builds random-weight models of one shape and exports them with ``mks2.export.export_model`` (fp32):
   ``llama`` (stage ``base``: a plain ``LlamaForCausalLM`` export), ``mvm`` (stage 1, MVM in every layer,
   placement ``replace``, with a tiny CLIP front-end) and ``mome`` (stage 2: router + two experts per
   token, LoRA rank 8 on mlp, mvm, q_proj, v_proj) exported twice: ``mome`` with the adapters
   unmerged and ``mome_merged`` (``merge_lora=True``, the deployment form).
   Each is loaded back with ``AutoModelForCausalLM`` as a user would.
2. Times ``generate(do_sample=False, max_new_tokens=min_new_tokens=N)`` with each model's default
   cache (``use_cache`` from its generation_config) for N in ``--new-tokens`` and batch 1 (13-token
   prompt) and batch 8 (prompts of 6..13 tokens, left-padded). Models are interleaved within each
   repeat (llama, mvm, mome, llama, ...) so machine load drifts hit all of them alike; the figures are
   the medians over repeats of generated tokens (batch x N) per wall-clock second and per CPU second
   of this process (``time.process_time``: with one thread, what the work costs; other processes on a
   loaded machine delay it, and so change the wall-clock figure, far more than its CPU time).
3. Prints a Markdown table (both rates and their ratios to Llama) and one JSON line.

Targets (issue #14): mvm >= 0.9x and mome >= 0.8x of Llama's tokens/s. ``--threads`` (default 1):
torch intra-op threads; at these sizes one thread is fastest and least disturbed by other load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT_LEN = 13
BATCH8_LENGTHS = (13, 12, 11, 10, 9, 8, 7, 6)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=176)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[50, 200])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], choices=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="where the exports go (default: a temporary dir)")
    return p.parse_args()


def shape_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.vocab_size={args.vocab}",
        f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.intermediate}",
        f"model.num_layers={args.layers}",
        f"model.num_heads={args.heads}",
        f"model.num_kv_heads={args.kv_heads}",
        f"model.max_position_embeddings={max(256, PROMPT_LEN + max(args.new_tokens) + 8)}",
        "data.tokenizer=null",
        "train.precision=fp32",
    ]


def write_vision_tower(directory: Path) -> Path:
    """The demo's tiny CLIP vision tower with random weights (only its shape matters here)."""
    from transformers import CLIPVisionModel

    from mks2.demo.vision import preprocessor_config, vision_config

    torch.manual_seed(0)
    CLIPVisionModel(vision_config()).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))
    return directory


MOME = [
    "model.stage=mome",
    "model.mome.router_init_std=0.5",
    "model.lora.rank=8",
    "model.lora.dropout=0.0",
    "model.lora.targets=[mlp,mvm,q_proj,v_proj]",
    "model.vision.kind=none",
]
STAGES = {
    "llama": ["model.stage=base", "model.vision.kind=none"],
    "mvm": ["model.stage=mvm", "model.mvm.placement=replace", "model.mvm.layers=all", "model.vision.kind=clip"],
    "mome": MOME,
    "mome_merged": MOME,
}


def export_all(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    from mks2 import build_model, load_config
    from mks2.export import export_model

    vision = write_vision_tower(workdir / "clip")
    out = {}
    for name, stage in STAGES.items():
        extra = [f"model.vision.path={vision}"] if "model.vision.kind=clip" in stage else []
        cfg = load_config(None, [*shape_overrides(args), *stage, *extra])
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():  # random values everywhere, so routers and LoRA do real work
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        merge = name.endswith("_merged")
        export_model(model, cfg, workdir / name, dtype="fp32", merge_lora=merge, verify=False, progress=False,
                     force=True)  # fmt: skip
        out[name] = workdir / name
    return out


def prompts(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, 13] and attention mask."""
    gen = torch.Generator().manual_seed(batch)
    lengths = (PROMPT_LEN,) if batch == 1 else BATCH8_LENGTHS
    ids = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : PROMPT_LEN - n] = 0
        mask[row, : PROMPT_LEN - n] = 0
    return ids, mask


@torch.no_grad()
def time_generate(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one greedy generate() call."""
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed, cpu


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        dirs = export_all(args, workdir)
        # trust_remote_code below: every directory was just written by export_all (our own bundled code).
        models = {
            name: AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval() for name, d in dirs.items()
        }
        cases = [(b, n) for n in args.new_tokens for b in args.batches]
        inputs = {b: prompts(b, args.vocab) for b in args.batches}
        for model in models.values():  # warm-up: first-call allocations, lazy imports
            time_generate(model, *inputs[args.batches[0]], 4)
        seconds: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            for b, n in cases:
                for name, model in models.items():
                    seconds.setdefault((name, b, n), []).append(time_generate(model, *inputs[b], n))
        load = (load + os.getloadavg()[0]) / 2

    def rate(name: str, b: int, n: int, which: int) -> float:  # tokens per wall (0) or CPU (1) second
        return b * n / statistics.median(t[which] for t in seconds[(name, b, n)])

    rows = []
    for b, n in cases:
        for name in models:
            tps, cps = rate(name, b, n, 0), rate(name, b, n, 1)
            rows.append({"model": name, "batch": b, "new_tokens": n, "tokens_per_s": round(tps, 1),
                         "vs_llama": round(tps / rate("llama", b, n, 0), 3), "tokens_per_cpu_s": round(cps, 1),
                         "cpu_vs_llama": round(cps / rate("llama", b, n, 1), 3)})  # fmt: skip
    shape = (f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads "
             f"({args.kv_heads} kv), vocab {args.vocab}")  # fmt: skip
    cpu = platform.processor() or platform.machine()
    print(f"shape: {shape}; torch {torch.__version__}, {args.threads} threads, {cpu}, {os.cpu_count()} CPUs, "
          f"mean 1-min load {load:.2f}, median of {args.repeats}")  # fmt: skip
    print("\n| model | batch | new tokens | tokens/s | vs Llama | tokens/CPU-s | vs Llama (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['tokens_per_s']} | {r['vs_llama']:.2f}x "
              f"| {r['tokens_per_cpu_s']} | {r['cpu_vs_llama']:.2f}x |")  # fmt: skip
    print(json.dumps({"shape": shape, "threads": args.threads, "load": round(load, 2), "rows": rows}))


if __name__ == "__main__":
    main()
