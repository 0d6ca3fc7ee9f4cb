#!/usr/bin/env python
"""Stage-1 MVM pretraining (DESIGN §1): captioning + text-to-image retrieval into the MVM experts.

    deepspeed launch/pretrain_mvm.py                                   # the embedded demo (configs/demo.yaml)
    deepspeed --num_gpus 8 launch/pretrain_mvm.py --config configs/llama2_7b_stage1.yaml train.lr=2e-4
    torchrun --nproc_per_node 8 launch/pretrain_mvm.py --config ...
    mpirun -np 16 python launch/pretrain_mvm.py --config ...           # also srun under Slurm

Exit status: 0 when training finished or was preempted (SIGTERM: checkpoint saved), 1 on a config,
checkpoint, data or non-finite-loss error (the message says what to fix).
"""

from __future__ import annotations

import argparse
import sys

from mks2.config import load_config
from mks2.training.cli import USER_ERRORS, report_error, setup_logging
from mks2.training.run_log import logged_run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML run config (default: the embedded demo config)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)  # 1. the run config, validated (before torch loads)
        with logged_run(cfg.train.save_dir, sys.argv):  # <save_dir>/logs/: this start's log, any fatal error
            from mks2.demo import resolve
            from mks2.training import run_training
            from mks2.training.stage1 import Stage1Task

            cfg = resolve(cfg)  # 2. demo:NAME datasets / tokenizer / vision tower -> real paths
            run_training(cfg, Stage1Task(cfg))  # 3. paths checked, engine, resume, train, save
    except USER_ERRORS as exc:
        report_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
