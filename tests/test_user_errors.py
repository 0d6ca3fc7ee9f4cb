"""The known user-error paths, through the real entry points (launchers as a plain single-process ``python
launch/...``, tools as subprocesses): each ends in a non-zero exit and a one-line reason naming the key,
file or step, never a ``Traceback``. One table, cheapest paths first.

Paths that need a run or a special set-up are tested where that set-up lives (each asserts no traceback):

- changed ``train.seed`` on resume, plain python without MPI: tests/training/test_hardening.py
- full disk during a save: tests/training/test_hardening.py
- a second run into a busy save_dir: tests/checkpoint/test_run_lock.py
- a poisoned checkpoint at resume / convert / evaluate: tests/checkpoint/test_safe_loading.py
- an HF directory with foreign code at evaluate: tests/eval/test_remote_code.py
- a missing image at pretokenize: tests/data/test_pretokenize_cli_images.py
- undecodable images past ``data.max_images_skipped`` on 2 ranks: tests/training/test_bad_images_run.py
- a global batch that does not fit the world size under torchrun: tests/training/test_train_errors.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launching import FINETUNE, PRETRAIN, run
from tests.tiny import TINY

pytestmark = pytest.mark.slow


def _typo_template(tmp: Path) -> str:
    path = tmp / "typo.json"
    path.write_text(json.dumps({"zero_optimizaton": {"stage": 3}}))
    return str(path)


def _junk_checkpoint(tmp: Path) -> str:
    step = tmp / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("")  # marked complete, but without the trainer's files
    return str(tmp / "ckpt")


# (id, entry point, arguments (a function of the test's tmp_path and the demo cache), what the line must say)
CASES = [
    ("config typo", PRETRAIN, lambda t, c: [*TINY, "train.lrr=1e-4"], "did you mean 'train.lr'?"),
    ("missing config file", FINETUNE, lambda t, c: ["--config", str(t / "nope.yaml")],
     "config file not found: {t}/nope.yaml"),
    ("pipeline with zero3", PRETRAIN,
     lambda t, c: [*TINY, "parallel.mode=pipeline", "parallel.pipeline_stages=2", "parallel.zero_stage=3"],
     "parallel.zero_stage=3 cannot be used with parallel.mode=pipeline"),
    ("stages do not divide the world", PRETRAIN,
     lambda t, c: [*TINY, f"data.cache_dir={c}", "parallel.mode=pipeline", "parallel.pipeline_stages=2",
                   f"train.save_dir={t}/run"],
     "world size 1 is not divisible by parallel.pipeline_stages (2)"),
    ("missing data file", PRETRAIN,
     lambda t, c: [*TINY, f"data.cache_dir={c}", f"data.datasets=[{{path: {t}/no_such_dataset}}]",
                   f"train.save_dir={t}/run"],
     "data.datasets[0]: dataset directory not found: {t}/no_such_dataset"),
    ("resume=require without a checkpoint", PRETRAIN,
     lambda t, c: [*TINY, f"data.cache_dir={c}", "train.resume=require", f"train.save_dir={t}/empty"],
     "holds no complete checkpoint"),
    ("DeepSpeed template typo", PRETRAIN,
     lambda t, c: [*TINY, f"data.cache_dir={c}", f"parallel.ds_config={_typo_template(t)}", f"train.save_dir={t}/run"],
     "unknown key 'zero_optimizaton'; did you mean 'zero_optimization'?"),
    ("mks2 unknown command", "-m mks2", lambda t, c: ["pretokenise"], "did you mean 'pretokenize'?"),
    ("evaluate: missing question file", "tools/evaluate.py", lambda t, c: [str(t), "--mc", str(t / "missing.jsonl")],
     "evaluation file not found: --mc {t}/missing.jsonl"),
    ("pretokenize: missing input", "tools/pretokenize.py",
     lambda t, c: ["--input", str(t / "missing.jsonl"), "--format", "caption", "--tokenizer", str(t),
                   "--output", str(t / "out")],
     "input file not found: {t}/missing.jsonl"),
    ("convert: a checkpoint without its files", "tools/convert_to_hf.py",
     lambda t, c: ["--checkpoint", _junk_checkpoint(t), "--output", str(t / "hf")],
     "cannot read the trainer's mks2/trainer.json"),
]  # fmt: skip


@pytest.mark.parametrize(("entry", "arguments", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_without_a_traceback(entry, arguments, expected, tmp_path, demo_cache):
    args = arguments(tmp_path, demo_cache)
    if isinstance(entry, Path):  # a launcher: a plain python run (a world of one, no MPI)
        result = run("python", 1, args, script=entry, timeout=240)
        output, code = result.output, result.returncode
    else:
        from tests.launching import python

        done = python(*entry.split(), *args, timeout=240)
        output, code = done.stdout + done.stderr, done.returncode
    assert code != 0, output[-3000:]
    assert expected.format(t=tmp_path) in output, output[-3000:]
    assert "Traceback" not in output and "error: " in output, output[-3000:]
    assert not (tmp_path / "hf").exists()  # convert leaves nothing at --output
