#!/usr/bin/env python
"""Time the fast-feedback paths: ``--help`` and a config typo of both launchers (plain python and under
the ``deepspeed`` launcher), and ``mks2 COMMAND --help``. Each command runs ``--repeat`` times in a fresh
interpreter; the table gives the median and the slowest wall time. Target: under 3 s on 2 cores for
the launchers' own ``--help`` and config errors (the ``deepspeed`` runner itself imports torch first).

    python tools/bench_startup.py --repeat 5 > /tmp/startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TYPO = "train.max_stepz=10"  # an unknown key: the loader reports it with a did-you-mean

CASES = [
    ("python launch/pretrain_mvm.py --help", [sys.executable, "launch/pretrain_mvm.py", "--help"], 0),
    ("python launch/finetune_mome.py --help", [sys.executable, "launch/finetune_mome.py", "--help"], 0),
    (f"python launch/pretrain_mvm.py {TYPO}", [sys.executable, "launch/pretrain_mvm.py", TYPO], 1),
    (f"python launch/finetune_mome.py {TYPO}", [sys.executable, "launch/finetune_mome.py", TYPO], 1),
    ("deepspeed launch/pretrain_mvm.py --help", ["deepspeed", "launch/pretrain_mvm.py", "--help"], 0),
    (f"deepspeed launch/pretrain_mvm.py {TYPO}", ["deepspeed", "launch/pretrain_mvm.py", TYPO], 1),
    ("mks2 --help", [sys.executable, "-m", "mks2", "--help"], 0),
    ("mks2 convert --help", [sys.executable, "-m", "mks2", "convert", "--help"], 0),
    ("mks2 evaluate --help", [sys.executable, "-m", "mks2", "evaluate", "--help"], 0),
    ("mks2 pretokenize --help", [sys.executable, "-m", "mks2", "pretokenize", "--help"], 0),
]


def time_once(cmd: list[str], expect: int) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    if result.returncode != expect and not (expect == 1 and result.returncode != 0):
        raise SystemExit(f"error: {' '.join(cmd)} exited {result.returncode}: {result.stderr[-500:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
          f"Python {platform.python_version()}\n")  # fmt: skip
    print("| command | median | slowest |\n|---|---|---|")
    for label, cmd, expect in CASES:
        times = [time_once(cmd, expect) for _ in range(args.repeat)]
        print(f"| `{label}` | {statistics.median(times):.2f} s | {max(times):.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
