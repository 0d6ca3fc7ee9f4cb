"""Shared builders for the export tests: tiny run configs and models, and a real multi-rank launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mks2 import build_model, load_config
from mks2.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128  # tests.fixtures.make_tiny_llama's vocabulary


def run_config(*overrides: str, llama_dir: Path | None = None, vision_dir: Path | None = None) -> RunConfig:
    """A validated RunConfig of a tiny model (no data needed for export tests)."""
    ov = [
        "data.seq_len=64",
        "data.tokenizer=null",
        "model.lora.dropout=0.0",
        "model.lora.rank=4",
        "train.precision=fp32",
    ]
    if llama_dir is not None:
        ov.append(f"model.init_from={llama_dir}")
    else:
        ov += [f"model.vocab_size={VOCAB}", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
               "model.num_heads=4", "model.num_kv_heads=2", "model.max_position_embeddings=128"]  # fmt: skip
    if vision_dir is not None:
        ov += ["model.vision.kind=clip", f"model.vision.path={vision_dir}"]
    else:
        ov.append("model.vision.kind=none")
    return load_config(None, [*ov, *overrides])


@torch.no_grad()
def jitter_(model: torch.nn.Module, *, std: float = 0.05, seed: int = 0, only: tuple[str, ...] = ()) -> None:
    """Random values for every parameter (or those whose name contains one of ``only``), so that
    LoRA B, routers, zero-initialised MVM down-projections all matter in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not only or any(tag in name for tag in only):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def tiny_model(cfg: RunConfig, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    jitter_(model, seed=seed)
    return model


def random_ids(batch: int, seq: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(script: str, args: list[str], *, nproc: int = 2, timeout: float = 300) -> str:
    """Run ``launch/<script>`` on ``nproc`` CPU ranks with the real ``deepspeed`` launcher; returns its
    output, raising with the output's tail on failure or timeout (the whole process group is killed)."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} timed out after {timeout}s:\n{out[-3000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def python(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the interpreter (default cwd: the repository; note that there ``kernels/`` is importable as a
    top-level package, which transformers mistakes for PyPI's ``kernels``)."""
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout)
