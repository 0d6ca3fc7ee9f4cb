"""mks2: DeepSpeed training system for MKS2 (Modular Visual Memory + soft MoME inside Llama).

Layers, lowest first (docs/ARCHITECTURE.md; a module imports only its own layer or lower ones):
base (``errors``, ``fileio``, ``constants``, ``config``, ``ops``) -> ``model`` -> ``data`` ->
``checkpoint`` -> ``training`` -> ``export`` -> ``demo`` -> ``eval``. This facade imports only the base.
"""

from mks2.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "build_model", "load_config"]
__version__ = "0.1.0"


def build_model(cfg: RunConfig, **kwargs):
    """Build the MKS2 model of ``cfg.model`` (loading ``model.init_from`` when set). See mks2.model."""
    from mks2.model import build_model as _build

    return _build(cfg, **kwargs)
