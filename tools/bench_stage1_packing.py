"""Stage-1 throughput, packed vs padded micro-batches (issue #11), interleaved in one run on this machine.

Captions follow a CC3M/SBU-like length distribution (log-normal words, mean ~12, long tail clipped at
60; ~1.3 tokens per word), each with a 32-token image prefix (BLIP-2's query tokens). The model is the
Llama-2-7B stage-1 shape (MVM ``replace`` on every layer, seq_len 256, P = 32) scaled down to what a CPU
runs: width, depth and vocabulary shrink, the sequence layout does not. Each step trains the SAME
``--global`` captions in both layouts (forward + backward of the stage-1 objective, fp32):

- padded (``data.packing=false``): GAS micro-batches of ``--micro`` captions, both views padded to
  seq_len, [2 x micro, 256] per micro-batch;
- packed (``data.packing=true``): the same captions planned into GAS micro-batches of
  ``--budget`` tokens ([budget / 256, 256]) by ``mks2.data.stage1_packing``.

The frozen vision towers are left out (the same work per image in both layouts): random features
stand in for their output. Prints captions/s, padding_fraction and the planner's time per step.

    nice python tools/bench_stage1_packing.py [--steps 3] [--micro 28] [--gas 2] [--budget 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMG, BOS, EOS = -200, 1, 2
P, SEQ = 32, 256


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Caption tokens (without BOS/EOS): log-normal words (median ~10.5, mean ~12), 1..60 words, 1.3 tok/word."""
    words = np.clip(np.round(rng.lognormal(mean=np.log(10.5), sigma=0.5, size=n)), 1, 60)
    return np.maximum(1, np.round(words * 1.3)).astype(int)


def make_vision_checkpoint(directory: Path) -> None:
    """A small random BLIP-2 with 32 query tokens: gives the model P = 32 and a feature width."""
    from transformers import Blip2Config, Blip2Model, BlipImageProcessor

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=16)  # fmt: skip
    qformer = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   cross_attention_frequency=1, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                word_embed_proj_dim=16, max_position_embeddings=64)  # fmt: skip
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config={"model_type": "opt", **text},
                      num_query_tokens=P)  # fmt: skip
    Blip2Model(cfg).save_pretrained(directory)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


def record(n: int, rng: np.random.Generator, vocab: int) -> dict:
    ids = np.concatenate([[BOS, IMG], rng.integers(3, vocab, size=n), [EOS]]).astype(np.int32)
    mask = np.array([0, 0] + [1] * (n + 1), dtype=np.int8)
    return {"input_ids": ids, "loss_mask": mask, "pixel_values": torch.zeros(1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout (after one warm-up step each)")
    ap.add_argument("--micro", type=int, default=28, help="train.micro_batch_size (captions per micro-batch)")
    ap.add_argument("--gas", type=int, default=2, help="micro-batches per step (global batch = micro x gas)")
    ap.add_argument("--budget", type=int, default=2048, help="data.tokens_per_micro_batch of the packed layout")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mks2.config import load_config
    from mks2.data.collate import Collator
    from mks2.data.stage1_packing import PackedPairCollator, StepHeader, max_caption_view, plan_step, view_lengths
    from mks2.model import build_model
    from mks2.training.stage1 import PackedStage1Objective, Stage1Objective, Stage1Task, stack_views

    tmp = Path(tempfile.mkdtemp(prefix="bench_s1_"))
    make_vision_checkpoint(tmp / "blip2")
    inter = int(args.hidden * 11008 / 4096 // 8 * 8)  # the 7B MLP ratio
    cfg = load_config(None, [
        "model.stage=mvm", f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={inter}", f"model.num_layers={args.layers}", "model.num_heads=4",
        "model.num_kv_heads=4", "model.max_position_embeddings=512", "model.vision.kind=blip2",
        f"model.vision.path={tmp / 'blip2'}", f"data.seq_len={SEQ}", "train.precision=fp32",
        f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro * args.gas}",
        f"data.tokens_per_micro_batch={args.budget}",
    ])  # fmt: skip
    task = Stage1Task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    feat_dim, embed_dim = model.vision.feature_dim, model.retrieval.proj.out_features
    padded_obj, packed_obj = Stage1Objective(model, task), PackedStage1Objective(model, task)
    rows = args.budget // SEQ
    padded_collate = Collator(seq_len=SEQ, num_prefix_tokens=P, image_token_id=IMG, pad_id=0, eos_id=EOS,
                              retrieval=True)  # fmt: skip
    packed_collate = PackedPairCollator(seq_len=SEQ, rows=rows, num_prefix_tokens=P, image_token_id=IMG, pad_id=0,
                                        eos_id=EOS)  # fmt: skip
    max_cap = max_caption_view(SEQ, rows, P)
    rng = np.random.default_rng(0)
    G = args.micro * args.gas

    def vision(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(k, P, feat_dim), F.normalize(torch.randn(k, embed_dim), dim=-1)

    def padded_step(recs: list[dict]) -> tuple[int, int, int]:
        real = positions = 0
        for m in range(args.gas):
            batch = padded_collate([[r] for r in recs[m * args.micro : (m + 1) * args.micro]])
            real += int((batch["segment_ids"] != 0).sum() + (batch["ret_segment_ids"] != 0).sum())
            feats, emb = vision(args.micro)
            kw = stack_views(batch) | {"vision_features": feats, "image_emb": emb,
                                       "ret_eos_index": batch["ret_eos_index"]}  # fmt: skip
            positions += kw["input_ids"].numel()
            (padded_obj(**kw) / args.gas).backward()
        return G, real, positions

    def packed_step(recs: list[dict], carry: list[dict]) -> tuple[int, int, int, float, list[dict]]:
        t0 = time.perf_counter()
        todo = carry + recs[: G - len(carry)]
        views = [view_lengths(len(r["input_ids"]), num_prefix_tokens=P, max_caption=max_cap) for r in todo]
        bins, left = plan_step([(0, i) for i in range(len(todo))], views, bins=args.gas, rows=rows, seq_len=SEQ)
        kept = [v for k, v in enumerate(views) if k not in set(left)]
        header = StepHeader(caption_tokens=sum(v.labels for v in kept), pairs=len(kept), micro_batches=args.gas)
        plan_s = time.perf_counter() - t0
        real = positions = 0
        for b in bins:
            batch = packed_collate([header, *({**todo[s.index], "slot": s} for s in b)])
            real += int((batch["segment_ids"] != 0).sum())
            positions += batch["input_ids"].numel()
            feats, emb = vision(len(b))
            n = batch["step_micro_batches"].double()
            kw = {k: batch[k] for k in ("input_ids", "position_ids", "segment_ids", "labels", "ret_eos_flat")}
            kw |= {"vision_features": feats, "image_emb": emb,
                   "caption_scale": (n / batch["step_caption_tokens"]).float().reshape(1),
                   "retrieval_scale": (n / batch["step_pairs"]).float().reshape(1)}  # fmt: skip
            packed_obj(**kw).backward()
        return len(kept), real, positions, plan_s, [todo[k] for k in left]

    totals = {name: {"captions": 0, "real": 0, "positions": 0, "seconds": 0.0} for name in ("padded", "packed")}
    carry: list[dict] = []
    plan_times, carried = [], []
    for step in range(args.steps + 1):
        recs = [record(int(n), rng, args.vocab) for n in caption_lengths(G, rng)]
        for name in ("padded", "packed") if step % 2 == 0 else ("packed", "padded"):  # interleaved, alternating
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if name == "padded":
                n, real, pos = padded_step(recs)
            else:
                n, real, pos, plan_s, carry = packed_step(recs, carry)
                plan_times.append(plan_s)
                carried.append(len(carry))
            dt = time.perf_counter() - t0
            task.sink.drain(torch.device("cpu"))
            if step == 0:
                continue  # warm-up
            t = totals[name]
            t["captions"] += n
            t["real"] += real
            t["positions"] += pos
            t["seconds"] += dt
    out = {
        "config": {"hidden": args.hidden, "layers": args.layers, "intermediate": inter, "vocab": args.vocab,
                   "seq_len": SEQ, "prefix": P, "micro": args.micro, "gas": args.gas, "global": G,
                   "budget": args.budget, "steps": args.steps, "threads": args.threads},  # fmt: skip
    }
    for name, t in totals.items():
        out[name] = {
            "captions_per_s": t["captions"] / t["seconds"],
            "captions_per_step": t["captions"] / args.steps,
            "padding_fraction": 1 - t["real"] / t["positions"],
            "positions_per_step": t["positions"] / args.steps,
            "seconds_per_step": t["seconds"] / args.steps,
        }
    out["speedup"] = out["packed"]["captions_per_s"] / out["padded"]["captions_per_s"]
    out["plan_ms_per_step"] = 1000 * float(np.mean(plan_times))
    out["carried_per_step"] = float(np.mean(carried))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
