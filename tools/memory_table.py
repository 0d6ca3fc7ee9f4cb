"""Memory and traffic figures of the shipped Llama-2 configs: 7B and 13B x stage 1 (MVM) and stage 2 (MoME)
x ``parallel.frozen_base`` (partition = ZeRO-3, replicate = ZeRO-2) at 8 and 256 GPUs (8 per node).

Parameter counts come from our own model built on the meta device from ``configs/llama2_*.yaml`` (no
weights read, nothing allocated), split into frozen and trainable by ``mks2.model.build``'s rules; the
BLIP-2 vision side (frozen, replicated outside the engine, in the training dtype) is added as a constant.

Per rank, model states only (activations excluded; they depend on micro-batch and checkpointing):

- ours, partition: frozen 2 B/N + trainable 18 B/N (bf16 weight and gradient, fp32 gradient, master and
  two Adam moments; DeepSpeed's own 18) + two gathered decoder layers in bf16 (the one running and the one
  prefetched) + the vision tower;
- ours, replicate: every LLM weight in bf16 (2 B) + trainable 18 B/N (ZeRO-2 partitions the gradients and
  the optimizer state) + two bf16 reduce buckets (``ds_configs/zero2.json``) + the vision tower;
- DeepSpeed's estimators (``estimate_zero3/zero2_model_states_mem_needs``), which treat every parameter as
  trainable: an upper bound for our frozen-heavy models, printed for comparison.

Host per node: what building the model takes at start-up with 8 ranks a node: partition builds under
``zero.Init`` (DeepSpeed's zero_init estimate); replicate builds every weight on every rank in
``model.dtype`` before it moves to the GPU (8 x the model).

``--traffic``: bytes each GPU receives per micro-batch for its parameters and gradients, and the compute
time of that micro-batch at an assumed sustained rate, to choose ``parallel.frozen_base``.

    python tools/memory_table.py [--traffic] [--tflops 400] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
GPUS_PER_NODE = 8
# BLIP-2 (blip2-opt-2.7b) vision side that runs replicated outside the engine: ViT-g/14 (~986M) + Q-Former
# (~107M) + 32 query tokens; the vision->LLM mapping (768 x hidden) is trainable and inside the engine.
VISION_FROZEN = 1_093_000_000
QFORMER_HIDDEN = 768
REDUCE_BUCKET = 200_000_000  # ds_configs/zero2.json reduce_bucket_size (elements; two buckets in flight)


@dataclass(frozen=True)
class Counts:
    name: str
    frozen: int  # LLM parameters that do not train (vision towers excluded)
    trainable: int  # trainable parameters inside the engine (vision mapping included)
    layer: int  # parameters of one decoder layer (what ZeRO-3 gathers at a time)
    largest: int  # largest single parameter tensor (DeepSpeed's "largest layer")
    micro_batch: int
    seq_len: int
    accumulation: int

    @property
    def total(self) -> int:
        return self.frozen + self.trainable


def count(config: Path) -> Counts:
    """Build the config's model on the meta device and count its frozen and trainable parameters."""
    import torch

    from mks2.config import VisionKind, load_config
    from mks2.model.build import build_model

    cfg = load_config(config, ["model.init_from=null", "model.init_from_stage1=null"])
    cfg.model.vision.kind = VisionKind.NONE  # after validation (stages 1/2 need one): towers counted as a constant
    with torch.device("meta"):
        model = build_model(cfg, load_weights=False)
    frozen = trainable = largest = 0
    for p in model.parameters():
        largest = max(largest, p.numel())
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    mapping = QFORMER_HIDDEN * cfg.model.hidden_size + cfg.model.hidden_size  # trainable with a vision tower
    t = cfg.train
    return Counts(
        config.stem, frozen, trainable + mapping, layer, largest, t.micro_batch_size, cfg.data.seq_len,
        int(t.grad_accumulation_steps or 1),
    )  # fmt: skip


def ours_gpu(c: Counts, mode: str, gpus: int) -> float:
    vision = 2 * VISION_FROZEN
    if mode == "partition":
        return (2 * c.frozen + 18 * c.trainable) / gpus + 2 * 2 * c.layer + vision
    return 2 * c.total + 18 * c.trainable / gpus + 2 * 2 * REDUCE_BUCKET + vision


def ours_host(c: Counts, mode: str) -> float:
    if mode == "partition":  # zero.Init: each rank materialises one tensor at a time, then keeps 1/N
        return 4 * c.largest * GPUS_PER_NODE * 1.5
    return 2 * c.total * GPUS_PER_NODE  # model.dtype bf16 (the shipped configs) built whole on every rank


def deepspeed_figures(c: Counts, mode: str, gpus: int) -> tuple[float, float]:
    """(GPU per rank, host per node) from DeepSpeed's own estimators, every parameter counted trainable."""
    nodes = max(1, gpus // GPUS_PER_NODE)
    if mode == "partition":
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            c.total, c.largest, GPUS_PER_NODE, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(c.total, GPUS_PER_NODE, nodes, cpu_offload=False)
    return gpu, cpu


def traffic(c: Counts, mode: str, gpus: int) -> float:
    """Bytes one GPU receives per micro-batch (ring collectives: (N-1)/N of the full tensor)."""
    share = (gpus - 1) / gpus
    grads = 2 * c.trainable * share  # reduce-scatter of the bf16 gradients, every micro-batch
    if mode == "partition":  # all-gather of every weight in forward, recompute and backward
        return 3 * 2 * c.total * share + grads
    return grads + 2 * c.trainable * share / c.accumulation  # + the updated weights, once a step


def compute_seconds(c: Counts, tflops: float) -> float:
    """Forward + recompute + input gradients over all weights, weight gradients of the trainable ones."""
    tokens = c.micro_batch * c.seq_len
    return tokens * (3 * 2 * c.total + 2 * c.trainable) / (tflops * 1e12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traffic", action="store_true", help="bytes moved per GPU per micro-batch, and compute time")
    ap.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s per GPU for --traffic")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 256])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    configs = [REPO / "configs" / f"llama2_{m}_stage{s}.yaml" for m in ("7b", "13b") for s in (1, 2)]
    counts = [count(p) for p in configs]
    print("| config | frozen | trainable | one layer |")
    print("|---|---:|---:|---:|")
    for c in counts:
        print(f"| {c.name} | {c.frozen / 1e9:.2f} B | {c.trainable / 1e9:.3f} B | {c.layer / 1e6:.0f} M |")
    print()
    print("| config | frozen_base | GPUs | GPU/rank, ours | GPU/rank, DeepSpeed est. | host/node, ours | "
          "host/node, DeepSpeed est. |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for c in counts:
        for mode in ("partition", "replicate"):
            for gpus in args.gpus:
                ds_gpu, ds_host = deepspeed_figures(c, mode, gpus)
                print(
                    f"| {c.name} | {mode} | {gpus} | {ours_gpu(c, mode, gpus) / GB:.1f} GB | {ds_gpu / GB:.1f} GB | "
                    f"{ours_host(c, mode) / GB:.0f} GB | {ds_host / GB:.0f} GB |"
                )
    if args.traffic:
        print()
        print(f"| config | micro x seq | GPUs | partition: GB/micro-batch | replicate: GB/micro-batch | "
              f"compute at {args.tflops:g} TFLOP/s | partition at 50 GB/s |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|")
        for c in counts:
            for gpus in args.gpus:
                part, rep = traffic(c, "partition", gpus), traffic(c, "replicate", gpus)
                print(
                    f"| {c.name} | {c.micro_batch} x {c.seq_len} | {gpus} | {part / GB:.1f} | {rep / GB:.2f} | "
                    f"{compute_seconds(c, args.tflops):.2f} s | {part / 50e9:.2f} s |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
