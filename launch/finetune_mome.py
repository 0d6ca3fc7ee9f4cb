#!/usr/bin/env python
"""Stage-2 MoME instruction tuning (DESIGN §1): LoRA on the MLP and MVM experts + per-token router,
continuing from a stage-1 checkpoint, on mixed text-only and multimodal instruction data.

    deepspeed launch/finetune_mome.py                       # demo: configs/demo_stage2.yaml from runs/demo_stage1
    deepspeed --num_gpus 8 launch/finetune_mome.py --config configs/llama2_7b_stage2.yaml \\
        model.init_from_stage1=runs/llama2_7b_stage1
    deepspeed launch/finetune_mome.py --ablation wo_mome    # a paper ablation / baseline preset (see below)
    torchrun --nproc_per_node 8 launch/finetune_mome.py --config ...
    mpirun -np 16 python launch/finetune_mome.py --config ...   # also srun under Slurm

Ablation presets (applied before the key=value overrides): mks2, wo_mm_sft, wo_text_sft, wo_mome,
wo_mm_sft_mome, inst_lora (mks2/training/ablations.py).

Exit status: 0 when training finished or was preempted (SIGTERM: checkpoint saved), 1 on a config,
checkpoint, data or non-finite-loss error (the message says what to fix).
"""

from __future__ import annotations

import argparse
import sys

from mks2.config import bundled_config, load_config
from mks2.training.cli import USER_ERRORS, report_error, setup_logging
from mks2.training.run_log import logged_run

DEMO_STAGE2_CONFIG = bundled_config("demo_stage2.yaml")  # configs/demo_stage2.yaml, shipped with the package


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEMO_STAGE2_CONFIG), help="YAML run config (default: the demo's)")
    parser.add_argument("--ablation", default=None, help="ablation/baseline preset, e.g. wo_mome or inst_lora")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return parser.parse_intermixed_args(argv)  # options may come between key=value overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        from mks2.training.ablations import ablation_overrides, check_ablation

        presets = ablation_overrides(args.ablation)  # 1. the run config (+ preset), validated (before torch)
        cfg = load_config(args.config, [*presets, *args.overrides])
        check_ablation(args.ablation, cfg)
        with logged_run(cfg.train.save_dir, sys.argv):  # <save_dir>/logs/: this start's log, any fatal error
            from mks2.demo import resolve
            from mks2.training import run_training
            from mks2.training.stage2 import Stage2Task

            cfg = resolve(cfg)  # 2. demo:NAME datasets / tokenizer / vision tower -> real paths
            task = Stage2Task(cfg)  # 3. stage-1 checkpoint: architecture + base; train.sft_data
            run_training(cfg, task)  # 4. paths checked, engine, resume, train, save
    except USER_ERRORS as exc:
        report_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
