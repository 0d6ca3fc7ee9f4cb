"""Run the stage-1 / stage-2 launchers under a real launcher on CPU ranks (reuses the stage-1 tests'
process-group timeout handling), and the tiny configs the stage-2 tests share."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.training.launchers import TINY, Result, env_for, finish, free_port

REPO = Path(__file__).resolve().parents[2]
STAGE1 = REPO / "launch" / "pretrain_mvm.py"
STAGE2 = REPO / "launch" / "finetune_mome.py"

# Stage 1 as the stage-1 tests run it (hidden 32, 2 layers), a few steps, one checkpoint at the end.
STAGE1_ARGS = [*TINY, "train.max_steps=4", "train.save_interval=0"]

# Stage 2 on the demo config: architecture from the stage-1 run; one sample per micro-batch so that in
# most steps one rank's micro-batch holds an image while the other's holds none (mixed batches).
STAGE2_ARGS = [
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.warmup_steps=2",
    "train.precision=fp32",
    "train.eval_interval=-1",
    "data.seq_len=96",
    "data.num_workers=0",
]
PIPELINE = ["parallel.mode=pipeline", "parallel.pipeline_stages=2"]


def command(script: Path, launcher: str, nproc: int, args: list[str]) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, str(script), *args]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(nproc), "--master_port", port, str(script), *args]
    if launcher == "mpirun":
        return [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nproc),
            sys.executable,
            str(script),
            *args,
        ]
    raise ValueError(launcher)


def run(
    script: Path, launcher: str, nproc: int, args: list[str], *, env: dict | None = None, timeout: float = 240
) -> Result:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        command(script, launcher, nproc, args),
        cwd=REPO,
        env=env_for(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return finish(proc, timeout, t0)


def run_stage2(nproc: int, args: list[str], **kw) -> Result:
    return run(STAGE2, "deepspeed", nproc, [*STAGE2_ARGS, *args], **kw)
