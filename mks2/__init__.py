"""mks2: DeepSpeed training system for MKS2 (Modular Visual Memory + soft MoME inside Llama).

Layers, lowest first (docs/ARCHITECTURE.md; a module imports only its own layer or lower ones):
base (``errors``, ``fileio``, ``constants``, ``config``, ``ops``) -> ``model`` -> ``data`` ->
``checkpoint`` -> ``training`` -> ``export`` -> ``demo`` -> ``eval``. This facade imports only the base,
and that lazily: ``import mks2.data.pretokenize`` in a spawned pretokenize worker does not load the
config stack (OmegaConf), which was most of a worker's start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mks2.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "build_model", "load_config"]
__version__ = "0.1.0"

_FROM_CONFIG = ("ConfigError", "RunConfig", "load_config")


def __getattr__(name: str) -> Any:
    if name in _FROM_CONFIG:
        from mks2 import config

        return getattr(config, name)
    raise AttributeError(f"module 'mks2' has no attribute {name!r}")


def build_model(cfg: RunConfig, **kwargs):
    """Build the MKS2 model of ``cfg.model`` (loading ``model.init_from`` when set). See mks2.model."""
    from mks2.model import build_model as _build

    return _build(cfg, **kwargs)
