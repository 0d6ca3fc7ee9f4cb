"""Generate an exported model's ``trust_remote_code`` Python files from the package's own sources.

Starting from the two entry templates (``mks2/export/remote/configuration_mks2.py`` and
``modeling_mks2.py``) every ``mks2`` module they import, directly or lazily inside a function, is
copied into the export directory as one flat file (``mks2.model.attention`` -> ``mks2_model_attention.py``).
The copies are the package files byte for byte except for their import statements:

- ``from mks2.a.b import x`` becomes ``from .mks2_a_b import x`` (the relative form transformers'
  dynamic-module loader recognises and copies along);
- ``mks2.ops`` (the fused-kernel dispatcher) is replaced by ``mks2.export.remote.ops_reference``, which
  computes the same mixing with the kernels' bundled pure-PyTorch reference.

An exported model needs only torch and transformers: the model code imports the config *schema*
(``mks2.config.schema``, stdlib only), never the YAML loader, so a bundled file that imports one of
``EXCLUDED_PACKAGES`` is refused rather than papered over.

Each file starts with a header naming its source file and that file's sha256, so the export can be
checked against the package it came from (``tests/export`` does, and compares logits).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

ENTRY_MODULES = {
    "mks2.export.remote.configuration_mks2": "configuration_mks2",
    "mks2.export.remote.modeling_mks2": "modeling_mks2",
}
"""Entry modules and their file names in the export (``auto_map`` points at these)."""

SUBSTITUTES = {"mks2.ops": "mks2.export.remote.ops_reference"}
"""Package modules replaced by a stand-in in exported models (see module docstring)."""

EXCLUDED_PACKAGES = ("omegaconf", "deepspeed")
"""Packages an exported model must not need (config loading, training): bundled code may not import them."""

INTERNAL_PACKAGES = ("mks2", "mks2_kernels")


class BundleError(RuntimeError):
    """A package source uses an import form the bundler cannot rewrite (names the file and line)."""


@dataclass(frozen=True)
class BundledFile:
    """One generated file: its name in the export, the package module and file it comes from."""

    name: str  # e.g. "mks2_model_attention.py"
    module: str  # e.g. "mks2.model.attention"
    source: Path
    source_sha256: str
    text: str


def bundled_name(module: str) -> str:
    """File stem of a package module in the export."""
    return ENTRY_MODULES.get(module) or module.replace(".", "_")


def module_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot locate the source file of module {module!r}")
    return Path(spec.origin)


def _is_internal(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in INTERNAL_PACKAGES


def _names(node: ast.ImportFrom) -> str:
    return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)


def _rewrite_node(node: ast.stmt, where: str) -> tuple[list[str], list[str]] | None:
    """New source lines (unindented) and the internal modules needed for one import statement, or
    None when the statement stays as it is."""
    if isinstance(node, ast.Import):
        _refuse_excluded([a.name for a in node.names], where)
        if any(_is_internal(a.name) for a in node.names):
            raise BundleError(
                f"{where}: 'import {node.names[0].name}' is not supported in bundled code; use 'from ... import'"
            )
        return None
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        raise BundleError(f"{where}: relative imports are not supported in bundled package code")
    module = node.module or ""
    _refuse_excluded([module], where)
    if not _is_internal(module):
        return None
    if module in INTERNAL_PACKAGES:  # from mks2 import ops: a submodule imported by name
        targets = [f"{module}.{a.name}" for a in node.names]
        unsupported = [t for t in targets if t not in SUBSTITUTES]
        if unsupported:
            raise BundleError(f"{where}: 'from {module} import ...' is only supported for {sorted(SUBSTITUTES)}")
        lines = [f"from .{bundled_name(SUBSTITUTES[t])} import {a.name}" for t, a in zip(targets, node.names)]
        return lines, [SUBSTITUTES[t] for t in targets]
    target = SUBSTITUTES.get(module, module)
    return [f"from .{bundled_name(target)} import {_names(node)}"], [target]


def _refuse_excluded(modules: list[str], where: str) -> None:
    excluded = sorted({m.split(".")[0] for m in modules} & set(EXCLUDED_PACKAGES))
    if excluded:
        raise BundleError(
            f"{where}: imports {', '.join(excluded)}, which an exported model must not need; model code imports "
            "the config schema (mks2.config.schema), not mks2.config or the training side"
        )


def rewrite_imports(source: str, where: str) -> tuple[str, list[str]]:
    """Rewrite the import statements of one package file (see module docstring).

    Returns the new text and the internal modules it imports. Every line that is not part of a
    rewritten import statement is kept byte for byte."""
    tree = ast.parse(source, filename=where)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line index, last line index, replacement lines)
    needed: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        result = _rewrite_node(node, f"{where}:{node.lineno}")
        if result is None:
            continue
        new, modules = result
        needed += modules
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        tail = lines[last][node.end_col_offset :].strip()
        if indent.strip() or (tail and not tail.startswith("#")):
            raise BundleError(f"{where}:{node.lineno}: an import must be alone on its line(s) to be rewritten")
        edits.append((first, last, [indent + line + "\n" for line in new]))
    for first, last, new in sorted(edits, reverse=True):
        lines[first : last + 1] = new
    return "".join(lines), needed


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_label(path: Path) -> str:
    """Path of a package file relative to the repository (``mks2/model/attention.py``)."""
    parts = path.resolve().parts
    for anchor in ("mks2", "kernels"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return path.name


def bundle_sources() -> dict[str, BundledFile]:
    """Every generated file, keyed by its name in the export (``modeling_mks2.py``, ...)."""
    out: dict[str, BundledFile] = {}
    pending = list(ENTRY_MODULES)
    seen: set[str] = set()
    while pending:
        module = pending.pop(0)
        if module in seen:
            continue
        seen.add(module)
        path = module_path(module)
        label = source_label(path)
        source = path.read_text(encoding="utf-8")
        text, needed = rewrite_imports(source, label)
        digest = _sha256(path)
        header = (
            f"# Generated by mks2.export.bundle from {label} (sha256 {digest}).\n"
            "# Do not edit: re-export the model instead. Only the mks2 imports differ from that file.\n"
        )
        name = bundled_name(module) + ".py"
        full = header + text
        compile(full, name, "exec")  # a rewrite that broke the syntax fails here, not at load time
        out[name] = BundledFile(name=name, module=module, source=path, source_sha256=digest, text=full)
        pending += [m for m in needed if m not in seen]
    return out


def write_bundle(directory: Path) -> dict[str, dict[str, str]]:
    """Write the generated files into ``directory``; returns {file: {source, sha256}} for the manifest."""
    manifest = {}
    for name, item in bundle_sources().items():
        (directory / name).write_text(item.text, encoding="utf-8")
        manifest[name] = {"source": source_label(item.source), "sha256": item.source_sha256}
    return manifest
