"""Files shipped with the package: the run configs of ``configs/`` and the DeepSpeed templates of
``ds_configs/``.

Both folders stay at the top of the repository, where users edit them, and are installed as the
package data of ``mks2._configs`` and ``mks2._ds_configs`` (``setup.py`` maps those package names to
the folders). So they are found through the package, never through a path relative to this source
file: an editable checkout and a ``pip install .`` into site-packages resolve them alike.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CONFIGS_PACKAGE = "mks2._configs"
DS_CONFIGS_PACKAGE = "mks2._ds_configs"


def _packaged(package: str, name: str) -> Path:
    """Path of data file ``name`` of ``package`` (installed packages are plain directories, so the
    resource is a real file that OmegaConf, json and argparse defaults can use)."""
    resource = files(package) / name
    if not isinstance(resource, Path):
        raise RuntimeError(f"{package} is not installed as a directory: cannot read {name} from {resource}")
    return resource


def bundled_config(name: str) -> Path:
    """A run config shipped in ``configs/``, e.g. ``bundled_config("demo.yaml")``."""
    return _packaged(CONFIGS_PACKAGE, name)


def ds_template(name: str) -> Path:
    """A DeepSpeed template shipped in ``ds_configs/``, e.g. ``ds_template("zero3.json")``."""
    return _packaged(DS_CONFIGS_PACKAGE, name)
