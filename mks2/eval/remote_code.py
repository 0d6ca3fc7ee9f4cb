"""Whether a Hugging Face model directory's own Python code may run (``trust_remote_code``).

A directory whose ``config.json`` has an ``auto_map`` (or that holds any ``.py`` file) ships code that
``from_pretrained(..., trust_remote_code=True)`` imports and runs. Evaluation runs it only when

- the user said so (``tools/evaluate.py --trust-remote-code``), or
- it is an ``mks2`` export whose code is exactly what this package would bundle today: every ``.py``
  file in the directory is one of ``mks2.export.bundle``'s generated files, byte for byte, and
  ``mks2_export.json`` records the same source sha256 for it. Then the code is this package's own
  and is trusted without the flag (the caller says so in its output).

Anything else is refused (``RemoteCodeRefused``) before any of the directory's code is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mks2.errors import UserError
from mks2.export.bundle import bundle_sources
from mks2.export.convert import EXPORT_MANIFEST


class RemoteCodeRefused(UserError, ValueError):
    """The model directory ships Python code that is neither this package's bundle nor trusted by the
    user (names the directory and the first mismatch)."""


@dataclass(frozen=True)
class RemoteCodeDecision:
    trust: bool  # what to pass as trust_remote_code
    note: str | None  # what to tell the user (None: the directory has no code of its own)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RemoteCodeRefused(f"{path}: cannot be read as JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def bundle_mismatch(directory: Path) -> str | None:
    """None if every ``.py`` file of ``directory`` is this package's bundle as recorded in its
    ``mks2_export.json``; else the first reason it is not."""
    manifest_path = directory / EXPORT_MANIFEST
    if not manifest_path.is_file():
        return f"no {EXPORT_MANIFEST} (not an mks2 export)"
    recorded = _read_json(manifest_path).get("bundle") or {}
    if not isinstance(recorded, dict) or not recorded:
        return f"{EXPORT_MANIFEST} records no bundled files"
    expected = bundle_sources()
    present = sorted(p.name for p in directory.rglob("*.py"))
    for name in present:
        item = expected.get(name)
        if item is None:
            return f"{name} is not a file this package bundles"
        if (recorded.get(name) or {}).get("sha256") != item.source_sha256:
            return f"{name}: the sha256 in {EXPORT_MANIFEST} is not that of this package's {item.module}"
        if (directory / name).read_text(encoding="utf-8") != item.text:
            return f"{name} differs from this package's bundled {item.module}"
    missing = sorted(set(expected) - set(present))
    if missing:
        return f"bundled file(s) missing: {', '.join(missing)}"
    return None


def decide_remote_code(directory: str | Path, *, trust_remote_code: bool) -> RemoteCodeDecision:
    """What ``from_pretrained`` may be told for ``directory`` (see module docstring)."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    has_code = "auto_map" in config or any(directory.rglob("*.py"))
    if not has_code:
        return RemoteCodeDecision(trust=False, note=None)
    if trust_remote_code:
        return RemoteCodeDecision(trust=True, note=f"{directory}: running its bundled code (--trust-remote-code)")
    reason = bundle_mismatch(directory)
    if reason is None:
        return RemoteCodeDecision(
            trust=True,
            note=f"{directory}: its code is this package's mks2 bundle (hashes match {EXPORT_MANIFEST} and the "
            "package sources): trusted without --trust-remote-code",
        )
    raise RemoteCodeRefused(
        f"{directory} ships Python code that would run on loading, and it is not this package's mks2 bundle "
        f"({reason}); none of it was imported. Pass --trust-remote-code only if you trust that code"
    )
