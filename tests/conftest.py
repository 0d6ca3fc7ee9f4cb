"""Session-wide fixtures shared by every test area."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A ``data.cache_dir`` holding a complete demo-world build (built once per test session, ~30 s on
    2 cores). Set ``MKS2_DEMO_CACHE=DIR`` to reuse a persistent cache across sessions: the build is
    keyed by the generator's source hash, so a stale build there is never reused."""
    from mks2.demo import ensure_built

    env = os.environ.get("MKS2_DEMO_CACHE")
    cache = Path(env).expanduser() if env else tmp_path_factory.mktemp("demo_cache")
    ensure_built(cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def demo_root(demo_cache) -> Path:
    """Root directory of the session's demo build (``<demo_cache>/demo-v<V>-<fingerprint>``)."""
    from mks2.demo import build_dir_name

    return demo_cache / build_dir_name()
