"""No code runs from a checkpoint: a ``zero_pp_rank_0_mp_rank_00_model_states.pt`` whose pickle would
write a marker file is refused (naming the file and the type) by resume, conversion and evaluation,
and the marker never appears. The real files of a tiny run load through the allow-list."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mks2 import checkpoint as ckpt
from tests.launching import REPO, env_for, run, tail
from tests.tiny import TINY

pytestmark = pytest.mark.slow

POISONED = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class _Payload:
    """Pickles as a call of os.system (what an attacker would put into a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step single-process zero3 run (one checkpoint, step 2)."""
    save_dir = tmp_path_factory.mktemp("safe") / "run"
    result = run("python", 1, [*TINY, "train.max_steps=2", f"train.save_dir={save_dir}"], timeout=240)
    assert result.returncode == 0, tail(result)
    return save_dir


def _poisoned_copy(tiny_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    save_dir = tmp_path / "poisoned"
    shutil.copytree(tiny_run, save_dir)
    marker = tmp_path / "PWNED"
    target = save_dir / ckpt.tag_for(2) / POISONED
    state = ckpt.safe_load(target)
    state["payload"] = _Payload(marker)
    torch.save(state, target)
    return save_dir, marker


def test_every_file_of_a_real_checkpoint_loads_weights_only(tiny_run):
    step = tiny_run / ckpt.tag_for(2)
    assert ckpt.check_checkpoint_files(step) >= 3  # model states, optimizer states, rank state
    for file in step.rglob("*.pt"):
        assert isinstance(ckpt.safe_load(file), dict)


def test_safe_loaders_refuse_the_poisoned_file_without_running_it(tiny_run, tmp_path):
    save_dir, marker = _poisoned_copy(tiny_run, tmp_path)
    file = save_dir / ckpt.tag_for(2) / POISONED
    with pytest.raises(ckpt.UnsafeCheckpointError, match=rf"{POISONED}.*posix\.system|{POISONED}.*os\.system"):
        ckpt.safe_load(file)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=POISONED):
        ckpt.check_checkpoint_files(save_dir / ckpt.tag_for(2))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=POISONED):
        ckpt.open_consolidated(save_dir)
    # DeepSpeed's own loaders (checkpoint engine, zero_to_fp32) under our replacements.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils import zero_to_fp32

    class FakeEngine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = FakeEngine()
    ckpt.install_safe_checkpoint_engine(engine)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=POISONED):
        engine.checkpoint_engine.load(str(file), map_location="cpu")
    with ckpt.safe_torch_load(), pytest.raises(ckpt.UnsafeCheckpointError, match=POISONED):
        zero_to_fp32.parse_model_states([str(file)])
    assert torch.load is not ckpt.safe_load  # restored after the block
    assert not marker.exists()


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        cwd=REPO, env=env_for(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def _assert_refused(output: str, returncode: int) -> None:
    assert returncode != 0
    assert POISONED in output and "refused to load" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_resume_convert_and_evaluate_refuse_the_poisoned_checkpoint(tiny_run, tmp_path):
    save_dir, marker = _poisoned_copy(tiny_run, tmp_path)
    resumed = run("python", 1, [*TINY, "train.max_steps=3", f"train.save_dir={save_dir}"], timeout=240)
    _assert_refused(resumed.output, resumed.returncode)
    assert not (save_dir / ckpt.tag_for(3)).exists()
    converted = _tool("convert_to_hf.py", "--checkpoint", str(save_dir), "--output", str(tmp_path / "hf"), "--quiet")
    _assert_refused(converted.stdout + converted.stderr, converted.returncode)
    assert not (tmp_path / "hf").exists()
    questions = tmp_path / "questions.jsonl"  # valid: the CLI checks its inputs before the checkpoint
    questions.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    evaluated = _tool("evaluate.py", str(save_dir), "--mc", str(questions))
    _assert_refused(evaluated.stdout + evaluated.stderr, evaluated.returncode)
    assert not marker.exists()
