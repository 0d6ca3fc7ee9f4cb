#!/usr/bin/env python
"""Convert an mks2 training checkpoint into a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint runs/demo_stage1 --output hf/demo_stage1
    python tools/convert_to_hf.py --checkpoint runs/llama2_7b_stage2 --tag step_00002000 \\
        --output hf/mks2-7b --dtype bf16 --merge-lora --max-shard-size 5GB
    python tools/convert_to_hf.py --checkpoint runs/llama2_7b_stage2 --output hf/mks2-7b-lora --adapter-only

Any checkpoint the trainer writes (zero3 or pipeline mode, stage 1 or 2, with or without LoRA) is
read in one process (DeepSpeed's ZeRO reader / the pipeline layer files), streamed tensor by tensor
into safetensors shards, and written with config.json, generation_config.json, the tokenizer and a
model card. A base-stage model without vision becomes a plain LlamaForCausalLM; every other model
gets the mks2 model code bundled (load it with trust_remote_code=True). The output is built in a
hidden temporary directory next to --output, verified (transformers loads it; its logits must match
ours), and only then renamed into place.

Exit status: 0 on success, 1 on a user error (bad checkpoint, existing output, failed verification).
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", required=True, help="the run's train.save_dir (or one step_XXXXXXXX directory in it)"
    )
    p.add_argument("--tag", default=None, help="checkpoint tag or step number (default: the newest complete one)")
    p.add_argument("--output", required=True, help="output directory (must be empty or absent, see --force)")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of the exported weights (default: the run's train.precision)",
    )
    p.add_argument(
        "--format",
        choices=("auto", "llama", "mks2"),
        default="auto",
        help="llama: plain LlamaForCausalLM (base stage without vision only); mks2: bundled model code; "
        "auto (default): llama when possible",
    )
    p.add_argument("--merge-lora", action="store_true", help="fold stage-2 LoRA adapters into the weights")
    p.add_argument("--adapter-only", action="store_true", help="write only the stage-2 LoRA adapters, in PEFT's format")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB; e.g. 500MB, 2GiB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the export with transformers and compare logits with our model (default: on)",
    )
    p.add_argument("--verify-atol", type=float, default=1e-4, help="largest allowed fp32 logit difference (1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mks2.errors import UserError
    from mks2.export import convert_checkpoint

    start = time.perf_counter()
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.output,
            tag=args.tag,
            dtype=args.dtype,
            fmt=args.format,
            merge_lora=args.merge_lora,
            adapter_only=args.adapter_only,
            max_shard_size=args.max_shard_size,
            force=args.force,
            verify=args.verify and not args.adapter_only,
            atol=args.verify_atol,
            progress=not args.quiet,
        )
    except (UserError, ValueError) as exc:  # plain ValueErrors: option parsing (--max-shard-size, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.directory} ({result.format}, {result.dtype}, {len(result.files)} files, "
        f"{human_bytes(result.total_bytes)} of weights) in {time.perf_counter() - start:.1f} s"
    )
    return 0


def human_bytes(n: int) -> str:
    """``812 B``, ``3.4 MiB``, ``13.5 GiB``: the largest binary unit that keeps the number at least 1."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())
