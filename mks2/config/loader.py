"""Loading run configs: YAML files + ``key=value`` overrides (OmegaConf) into the typed schema.

``load_config`` merges a YAML file (or the embedded demo default) with command-line overrides and
validates the result; all problems found (unknown keys, wrong types, bad enum values, impossible
combinations) are reported together in one ``ConfigError`` so a user fixes a config in one round trip.
The returned object is an OmegaConf ``DictConfig`` typed as ``RunConfig``: assignments to it are
type-checked against the schema.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mks2.config.bundled import bundled_config
from mks2.config.errors import ConfigError
from mks2.config.schema import DatasetSource, RunConfig, validate

DEMO_CONFIG = bundled_config("demo.yaml")
"""The embedded default run config (``configs/demo.yaml``, shipped with the package)."""

_DICT_LEAVES = {"model.rope_scaling"}
"""Dict-valued free-form fields: their keys are not schema keys."""


def _flatten(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, leaf value) for a plain nested dict; lists and dict-valued free-form
    fields (rope_scaling) are leaves."""
    if isinstance(node, dict) and node and prefix not in _DICT_LEAVES:
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _schema_field(key: str) -> tuple[Any, list[str]] | None:
    """Return (annotation, sibling names) of a dotted key in RunConfig, or None if unknown."""
    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not is_dataclass(cls):
            return None
        hints = get_type_hints(cls)
        if part not in hints:
            return None
        ann = hints[part]
        if i == len(parts) - 1:
            return ann, list(hints)
        cls = ann
    return None


def _unknown_key_message(key: str) -> str:
    parts = key.split(".")
    cls: Any = RunConfig
    for i, part in enumerate(parts):
        names = [f.name for f in fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + close)}'?" if close else ""
            return f"{key}: unknown key in {where} (allowed: {', '.join(names)}){hint}"
        cls = get_type_hints(cls)[part]
        if not is_dataclass(cls):
            return f"{key}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
    return f"{key}: unknown key"


def _type_message(key: str, value: Any, ann: Any) -> str:
    enum_cls = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, enum.Enum)), None)
    if enum_cls is not None:
        allowed = ", ".join(m.value for m in enum_cls)
        return f"{key}: invalid value {value!r} (allowed: {allowed})"
    name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return f"{key}: expected {name}, got {value!r} ({type(value).__name__})"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], source=str(path))
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml parse errors carry line numbers in their text
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    container = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(container, dict):
        raise ConfigError(["top level must be a mapping of sections"], source=str(path))
    return container


def _parse_overrides(overrides: Sequence[str], problems: list[str]) -> list[tuple[str, Any]]:
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value")
            continue
        try:
            dot = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except OmegaConfBaseException as exc:
            problems.append(f"override '{item}': {exc}")
            continue
        parsed.extend(_flatten(dot))
    return parsed


def _apply(cfg: DictConfig, key: str, value: Any, problems: list[str], origin: str) -> None:
    found = _schema_field(key)
    if found is None:
        problems.append(f"{_unknown_key_message(key)} [{origin}]")
        return
    ann, _ = found
    try:
        if key in ("data.datasets", "data.eval_datasets"):
            value = _dataset_list(key, value, problems, origin)
            if value is None:
                return
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException:
        problems.append(f"{_type_message(key, value, ann)} [{origin}]")


def _dataset_list(key: str, value: Any, problems: list[str], origin: str) -> list[dict] | None:
    """Normalise a dataset list (plain paths or {path, weight} mappings), reporting bad entries."""
    if not isinstance(value, (list, tuple)):
        problems.append(f"{key}: expected a list of dataset paths or {{path, weight}} mappings [{origin}]")
        return None
    allowed = [f.name for f in fields(DatasetSource)]
    out, ok = [], True
    for i, item in enumerate(value):
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "path" not in item:
            problems.append(f"{key}[{i}]: expected a path or a mapping with 'path' [{origin}]")
            ok = False
            continue
        for k in item:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                problems.append(f"{key}[{i}].{k}: unknown key (allowed: {', '.join(allowed)}){hint} [{origin}]")
                ok = False
        out.append(item)
    return out if ok else None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Merge a YAML run config (``None``: the embedded demo default) with ``key=value`` overrides,
    validate, and return the typed config (an OmegaConf-backed ``RunConfig``)."""
    yaml_path = Path(path) if path is not None else DEMO_CONFIG
    problems: list[str] = []
    cfg = OmegaConf.structured(RunConfig)
    for key, value in _flatten(_read_yaml(yaml_path)):
        _apply(cfg, key, value, problems, origin=yaml_path.name)
    for key, value in _parse_overrides(overrides, problems):
        _apply(cfg, key, value, problems, origin="override")
    problems.extend(validate(cfg))  # fields that failed to apply keep defaults, so this is safe
    if problems:
        raise ConfigError(problems, source=f"{yaml_path}" + (" + overrides" if overrides else ""))
    return cfg  # type: ignore[return-value]


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a validated config from a plain dict (e.g. the resolved config saved in a checkpoint)."""
    problems: list[str] = []
    cfg = OmegaConf.structured(RunConfig)
    for key, value in _flatten(data):
        _apply(cfg, key, value, problems, origin="dict")
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems, source="saved config")
    return cfg  # type: ignore[return-value]


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a config (enums as their string values)."""

    def plain(node: Any) -> Any:
        if isinstance(node, enum.Enum):
            return node.value
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()}
        if isinstance(node, list):
            return [plain(v) for v in node]
        return node

    return plain(OmegaConf.to_container(cfg, resolve=True))
