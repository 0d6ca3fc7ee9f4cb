"""Run ``launch/pretrain_mvm.py`` under a real launcher (deepspeed, torchrun, mpirun, plain python) on
CPU ranks, with a hard timeout that takes the whole process group down, and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "pretrain_mvm.py"

# configs/demo.yaml shrunk to a model that steps in well under a second on 2 shared cores.
TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.warmup_steps=2",
    "train.precision=fp32",
    "train.eval_interval=-1",
    "data.num_workers=0",
]


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, nproc: int, args: list[str]) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, str(LAUNCH), *args]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(nproc), "--master_port", port, str(LAUNCH), *args]
    if launcher == "mpirun":
        return [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nproc),
            sys.executable,
            str(LAUNCH),
            *args,
        ]
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, str(LAUNCH), *args]
    raise ValueError(launcher)


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.pop("MKS2_INJECT_NAN", None)
    env.pop("MKS2_FAULT_KILL_AFTER_STEP", None)
    env.update(extra or {})
    return env


def start(launcher: str, nproc: int, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command(launcher, nproc, args),
        cwd=REPO,
        env=env_for(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills launcher AND ranks
    )


def finish(proc: subprocess.Popen, timeout: float, t0: float) -> Result:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"launcher timed out after {timeout}s; output tail:\n{out[-4000:]}") from None
    return Result(proc.returncode, out, time.monotonic() - t0)


def run(
    launcher: str, nproc: int, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240
) -> Result:
    t0 = time.monotonic()
    return finish(start(launcher, nproc, args, env), timeout, t0)


def metrics(save_dir: Path) -> list[dict]:
    path = Path(save_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(result: Result, n: int = 3000) -> str:
    return result.output[-n:]
