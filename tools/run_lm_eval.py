#!/usr/bin/env python
"""Score an export with EleutherAI's lm-evaluation-harness on a local multiple-choice JSONL file.

    pip install lm_eval==0.4.13        # not in requirements: 33 packages, ~2.5 min to install here
    python tools/run_lm_eval.py hf/demo_stage2 --mc mc.jsonl [--limit 100] [--batch-size 8]
    python tools/run_lm_eval.py hf/mks2-7b --tasks piqa,arc_easy      # the harness's own tasks (need the Hub)

``--mc`` takes the JSONL format of ``tools/evaluate.py`` ({"question", "choices": [...], "answer": index});
the script writes a harness task for it (``Question: ...\\nAnswer:`` + each choice, accuracy by
log-likelihood) into a temporary ``--include_path`` and runs::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,dtype=float32 \\
        --tasks mks2_local_mc --include_path TMP --device cpu --batch_size N

offline (``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1``) unless ``--tasks`` names the harness's own
tasks. ``trust_remote_code=True`` is what an ``mks2_llama`` export needs (a plain Llama export ignores
it). Prints the harness's table; exit status is the harness's (1 if it is not installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TASK = "mks2_local_mc"


def task_yaml(mc_file: Path) -> str:
    return (
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {str(mc_file.resolve())!r}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export directory (tools/convert_to_hf.py output)")
    p.add_argument("--mc", type=Path, default=None, help="local multiple-choice JSONL (tools/evaluate.py format)")
    p.add_argument("--tasks", default=None, help="the harness's own task names instead of --mc")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if (args.mc is None) == (args.tasks is None):
        p.error("give exactly one of --mc FILE or --tasks NAMES")
    if args.mc is not None and not args.mc.is_file():
        p.error(f"--mc: {args.mc} is not a file")
    exe = shutil.which("lm_eval")
    if exe is None:
        print("run_lm_eval: lm_eval is not installed (pip install lm_eval==0.4.13)", file=sys.stderr)
        return 1
    model_args = f"pretrained={Path(args.model).resolve()},trust_remote_code=True,dtype=float32"
    cmd = [exe, "--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", str(args.batch_size)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if args.mc is not None:
            (Path(tmp) / f"{TASK}.yaml").write_text(task_yaml(args.mc))
            cmd += ["--tasks", TASK, "--include_path", tmp]
            env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        else:
            cmd += ["--tasks", args.tasks]
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
