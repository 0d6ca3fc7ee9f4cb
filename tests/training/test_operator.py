"""What an operator sees of a run: the trackers' files (TensorBoard, CSV, W&B offline), ``<save_dir>/logs/``
(header per start, fatal errors), file modes, the start-of-run summary, and the already-complete message.

One real 6-step stage-1 run on one process (plain python, no launcher), then two cheap starts on top of it.
"""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from tests.launching import run, tail
from tests.tiny import TINY

MONITORED = ["train.max_steps=6", "train.save_interval=0", "train.tensorboard=true", "train.csv=true",
             "train.wandb=true", "train.wandb_project=mks2-test", "train.wandb_run_name=tiny"]  # fmt: skip


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, demo_cache) -> dict:
    save_dir = tmp_path_factory.mktemp("monitored") / "run"
    args = [*TINY, *MONITORED, f"train.save_dir={save_dir}", f"data.cache_dir={demo_cache}"]
    result = run("python", 1, args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "args": args, "result": result}


def test_trackers_write_their_files(monitored_run):
    save_dir = monitored_run["save_dir"]
    assert "unknown inputs or outputs type" not in monitored_run["result"].output  # ZeRO-3 hooks see the tensors
    assert list((save_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    loss_csv = list((save_dir / "csv").rglob("Train_loss.csv"))
    assert loss_csv and len(loss_csv[0].read_text().splitlines()) >= 6  # header + one row a step
    offline = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((save_dir / "wandb").iterdir())
    (events,) = offline[0].glob("run-*.wandb")  # wandb's protobuf record log: run settings, config, history
    data = events.read_bytes()
    assert data.count(b"train/loss") >= 6 and b"mks2-test" in data and b"tiny" in data


def test_log_header_summary_and_modes(monitored_run):
    save_dir = monitored_run["save_dir"]
    text = (save_dir / "logs" / "train.log").read_text()
    assert text.count("command: ") == 1 and "launch/pretrain_mvm.py" in text and "train.max_steps=6" in text
    assert "world size: 1" in text and "deepspeed 0.19.8" in text and "git commit: " in text
    assert "training data (6 steps of 8 rows):" in text and "passes" in text
    assert "step 6: loss=" in text and "training finished at step 6" in text
    umask = os.umask(0)
    os.umask(umask)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    ckpt_dir = save_dir / "step_00000006"
    for path in (save_dir / "logs" / "train.log", ckpt_dir / "COMPLETE", ckpt_dir / "mks2" / "config.json",
                 save_dir / "metrics.jsonl"):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == want_file, path
    assert stat.S_IMODE((save_dir / "logs").stat().st_mode) == want_dir


def test_complete_run_says_so_and_how_to_continue(monitored_run):
    save_dir = monitored_run["save_dir"]
    args = [a for a in monitored_run["args"] if not a.startswith("train.wandb")]  # same run, no tracker
    result = run("python", 1, args)
    assert result.returncode == 0, tail(result)
    assert "nothing to train" in result.output and "raise train.max_steps" in result.output
    assert "train.resume=none" in result.output and "new train.save_dir" in result.output
    assert "Train" not in result.output.split("nothing to train")[1]  # no engine, no progress bar after it
    assert (save_dir / "logs" / "train.log").read_text().count("command: ") == 2  # appended, one header per start


def test_failed_run_leaves_its_error_in_the_log(tmp_path, demo_cache):
    save_dir = tmp_path / "run"
    result = run("python", 1, [*TINY, "train.max_steps=2", "train.resume=require", f"train.save_dir={save_dir}",
                               f"data.cache_dir={demo_cache}"])  # fmt: skip
    assert result.returncode == 1, tail(result)
    error_log = (save_dir / "logs" / "error_rank0.log").read_text()
    assert "train.resume=require" in error_log and "no complete checkpoint" in error_log
    assert "train.resume=require" in (save_dir / "logs" / "train.log").read_text()


def test_resume_with_another_schedule_warns(monitored_run, tmp_path):
    save_dir = tmp_path / "run"
    shutil.copytree(monitored_run["save_dir"], save_dir)  # leave the module's run as it is
    args = [a for a in monitored_run["args"] if not a.startswith(("train.wandb", "train.save_dir"))]
    result = run("python", 1, [*args, "train.max_steps=7", f"train.save_dir={save_dir}"])
    assert result.returncode == 0, tail(result)
    assert "different learning-rate schedule" in result.output
    assert "train.max_steps: checkpoint 6, now 7" in result.output
    assert "training finished at step 7" in result.output
