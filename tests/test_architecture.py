"""The package's layering (docs/ARCHITECTURE.md), checked over the source files with ``ast``.

Every ``import`` of an ``mks2`` module, at module level or inside a function, must point to the same
layer or a lower one: a function-local import may defer a heavy dependency, never hide a cycle. The
model stays free of the engine (no DeepSpeed, no ``mks2.training``), and every module imports on its
own in a fresh interpreter (forked from a parent that has only the third-party libraries loaded).
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mks2"

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    ("base", ("mks2.errors", "mks2.fileio", "mks2.constants", "mks2.config", "mks2.ops")),
    ("model", ("mks2.model",)),
    ("data", ("mks2.data",)),
    ("checkpoint", ("mks2.checkpoint",)),
    ("training", ("mks2.training",)),
    ("export", ("mks2.export",)),
    ("demo", ("mks2.demo",)),
    ("eval", ("mks2.eval",)),
    ("cli", ("mks2.cli", "mks2.__main__")),  # the console script: runs the tools (mks2._tools)
]
FACADE = "mks2"  # the package's __init__: imports only the base at module level, so anyone may import it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer of tests/test_architecture.py: add it to LAYERS")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path``, relative ones resolved.
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    top_level |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        out += [(t, node.lineno, id(node) in top_level) for t in targets]
    return out


def test_every_import_points_to_the_same_or_a_lower_layer():
    modules = all_modules()
    wrong = []
    for module, path in modules.items():
        for target, line, top in imports_of(module, path, modules):
            if target != "mks2" and not target.startswith("mks2."):
                continue
            if module == FACADE:
                if top and layer_of(target) != 0:
                    wrong.append(f"{path}:{line}: the package __init__ imports {target} at module level")
                continue
            if target != FACADE and layer_of(target) > layer_of(module):
                here, there = LAYERS[layer_of(module)][0], LAYERS[layer_of(target)][0]
                wrong.append(f"{path}:{line}: {module} ({here}) imports {target} ({there}, a higher layer)")
    assert not wrong, "layering violations (docs/ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    modules = all_modules()
    graph = {
        m: {t for t, _, _ in imports_of(m, p, modules) if t in modules and t != m and t != FACADE}
        for m, p in modules.items()
    }
    # A package's __init__ importing its own submodules (re-exports) and a submodule importing a sibling
    # are edges too: a cycle through them fails at import time depending on who is imported first.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_model_imports_neither_the_engine_nor_training():
    modules = all_modules()
    wrong = [
        f"{path}:{line}: {target}"
        for module, path in modules.items()
        if module.startswith("mks2.model")
        for target, line, _ in imports_of(module, path, modules)
        if target.split(".")[0] == "deepspeed" or target.startswith("mks2.training")
    ]
    assert not wrong, "mks2/model must stay free of DeepSpeed and mks2.training:\n" + "\n".join(wrong)


def test_every_module_imports_on_its_own():
    """Each module in a child forked from this process, with every ``mks2`` module dropped from the child's
    ``sys.modules`` first (third-party libraries stay loaded: they are not what this checks)."""
    names = sorted(all_modules())
    for name in names:  # loads every third-party library once, here; each child re-imports only mks2 code
        importlib.import_module(name)
    failed = []
    for name in names:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop every mks2 module the parent may hold, import one, report
            os.close(read)
            for loaded in [m for m in sys.modules if m == "mks2" or m.startswith("mks2.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
                message = b""
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                message = f"{type(exc).__name__}: {exc}".encode()
            os.write(write, message[:4000])
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
        if message:
            failed.append(f"{name}: {message}")
    assert not failed, "modules that fail to import on their own:\n" + "\n".join(failed)


def test_the_kernels_package_imports_nothing_of_mks2():
    kernels = PACKAGE.parent / "kernels"
    wrong = []
    for path in sorted(kernels.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            wrong += [f"{path}:{node.lineno}: {n}" for n in names if n == "mks2" or n.startswith("mks2.")]
    assert not wrong, "kernels/ (mks2_kernels) must stay usable without mks2:\n" + "\n".join(wrong)
