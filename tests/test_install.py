"""A non-editable install runs stage 1 on the demo: ``pip install .`` into a fresh virtual environment,
then ``launch/pretrain_mvm.py`` from a directory outside the repository.

This is what catches files that only a source checkout has (the run configs, the DeepSpeed templates,
the CUDA sources): the installed copy must find them through the package. The environment reuses the
machine's third-party packages (``--system-site-packages``, no network) and installs only mks2 itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mks2.checkpoint import MARKER, tag_for
from tests.launching import env_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "mks2", "kernels", "configs", "ds_configs", "tools")
"""What ``pip install .`` needs. Installed from a copy, so the build's ``build/`` and ``*.egg-info`` stay out
of the working tree."""


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}:\n{(res.stdout + res.stderr)[-4000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(python of a fresh venv holding a non-editable install of the working tree, its environment)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    venv = root / "venv"
    # --without-pip: the machine's pip and setuptools (system site-packages) build and install into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = env_for({"PIP_DISABLE_PIP_VERSION_CHECK": "1"})  # one thread per process, no fault injection
    env.pop("PYTHONPATH", None)  # nothing may point back at the checkout
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(src)]
    _run(pip, cwd=root, env=env, timeout=300)
    return python, env


def test_installed_package_is_the_venv_copy_and_ships_its_data(installed, tmp_path):
    python, env = installed
    probe = (
        "import json, mks2, mks2_kernels\n"
        "from mks2.config import DEMO_CONFIG, ds_template\n"
        "from mks2_kernels.cuda_mix import CSRC\n"
        "files = [DEMO_CONFIG, ds_template('zero3.json'), ds_template('pipeline.json'), CSRC / 'mome_mix_kernels.cu']\n"
        "print(json.dumps([mks2.__file__, mks2_kernels.__file__, *map(str, files), all(f.is_file() for f in files)]))\n"
    )
    res = _run([str(python), "-c", probe], cwd=tmp_path, env=env, timeout=120)
    *paths, all_exist = json.loads(res.stdout.strip().splitlines()[-1])
    venv = python.parents[1]
    for path in paths:  # the installed copy, not the editable checkout
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(REPO), path
    assert all_exist


def test_installed_console_script_runs_the_installed_tools(installed, tmp_path):
    python, env = installed
    exe = python.parent / "mks2"
    assert exe.is_file(), "pip install did not create the mks2 console script"
    probe = "import mks2._tools.plot_metrics as m; print(m.__file__)"
    res = _run([str(python), "-c", probe], cwd=tmp_path, env=env, timeout=120)
    assert Path(res.stdout.strip().splitlines()[-1]).is_relative_to(python.parents[1])  # the venv's copy
    res = _run([str(exe), "plot", "--help"], cwd=tmp_path, env=env, timeout=120)
    assert res.stdout.startswith("usage: mks2 plot")


def test_installed_package_runs_stage1_on_the_demo(installed, tmp_path, demo_cache):
    python, env = installed
    work, save_dir = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    overrides = ["train.max_steps=2", f"train.save_dir={save_dir}", f"data.cache_dir={demo_cache}"]
    _run([str(python), str(REPO / "launch" / "pretrain_mvm.py"), *overrides], cwd=work, env=env, timeout=300)
    steps = [json.loads(line)["step"] for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (save_dir / tag_for(2) / MARKER).is_file()  # the final checkpoint, complete
