"""The one way the tests start processes: a launch script under a real launcher (deepspeed, torchrun,
mpirun, plain python) on CPU ranks, or the interpreter on a tool. Every child gets one thread per rank and
no inherited fault injection; a launcher run past its timeout takes its whole process group down."""

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

from tests.tiny import STAGE2_ARGS

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain_mvm.py"  # stage 1
FINETUNE = REPO / "launch" / "finetune_mome.py"  # stage 2

# Read by the trainer (mks2.training.faults); a developer's shell that exports one must not leak it into
# every test's ranks, so only a test's explicit ``env`` sets them.
FAULT_VARIABLES = ("MKS2_INJECT_NAN", "MKS2_FAULT_KILL_AFTER_STEP")


@dataclass
class Result:
    returncode: int
    output: str  # stdout and stderr of the launcher and every rank, interleaved
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, one thread per process, no fault injection, then ``extra``."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    for name in FAULT_VARIABLES:
        env.pop(name, None)
    env.update(extra or {})
    return env


def command(launcher: str, nproc: int, args: list[str], *, script: Path = PRETRAIN) -> list[str]:
    """The command line that runs ``script`` on ``nproc`` local ranks under ``launcher``."""
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), str(script), *args]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(script), *args]
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc), sys.executable, str(script),
                *args]  # fmt: skip
    if launcher == "python":
        assert nproc == 1, "plain python runs one process"
        return [sys.executable, str(script), *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def start(
    launcher: str, nproc: int, args: list[str], env: dict[str, str] | None = None, *, script: Path = PRETRAIN
) -> subprocess.Popen:
    return subprocess.Popen(
        command(launcher, nproc, args, script=script),
        cwd=REPO,
        env=env_for(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills launcher AND ranks
    )


def finish(proc: subprocess.Popen, timeout: float, t0: float) -> Result:
    """Wait for a started launcher; past ``timeout`` seconds kill its process group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"launcher timed out after {timeout}s; output tail:\n{out[-4000:]}") from None
    return Result(proc.returncode, out, time.monotonic() - t0)


def run(
    launcher: str,
    nproc: int,
    args: list[str],
    *,
    script: Path = PRETRAIN,
    env: dict[str, str] | None = None,
    timeout: float = 480,  # a hang fails; a slow, loaded 2-core machine must not
) -> Result:
    t0 = time.monotonic()
    return finish(start(launcher, nproc, args, env, script=script), timeout, t0)


def run_stage2(nproc: int, args: list[str], **kw) -> Result:
    """Stage 2 under deepspeed on the tiny stage-2 settings (``args`` name the stage-1 run and the rest)."""
    return run("deepspeed", nproc, [*STAGE2_ARGS, *args], script=FINETUNE, **kw)


def python(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the interpreter on a tool or ``-c`` script, output captured (default cwd: the repository; note
    that there ``kernels/`` is importable as a top-level package, which transformers mistakes for PyPI's
    ``kernels``)."""
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=env_for(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def metrics(save_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``, one a step."""
    path = Path(save_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(result: Result, n: int = 3000) -> str:
    return result.output[-n:]
