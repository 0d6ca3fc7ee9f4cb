"""The config reference (``docs/CONFIG.md``), generated from the schema's attribute docstrings.

A field is documented by the string literal right under its declaration (the convention of
torchtitan's and LitGPT's config classes); Python keeps no such attribute, so the docstrings are read
from ``schema.py``'s source with ``ast``. ``leaf_fields`` walks every leaf key of ``RunConfig``
(``tests/test_config.py`` fails on one without a docstring) and ``config_reference`` renders them.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mks2.config import schema
from mks2.config.schema import RunConfig

REFERENCE_PATH = Path("docs") / "CONFIG.md"
"""Where the generated reference is committed, relative to the repository root."""


@dataclass(frozen=True)
class ClassDocs:
    """Docstrings of one schema class: the class's own and one per field (or enum member)."""

    summary: str
    fields: dict[str, str]


@functools.cache
def _schema_docs() -> dict[str, ClassDocs]:
    """{class name: its docs} for every class of ``schema.py``, read from the source file."""
    tree = ast.parse(Path(schema.__file__).read_text(encoding="utf-8"))
    out: dict[str, ClassDocs] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        for stmt, after in zip(node.body, node.body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
            elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                name = stmt.targets[0].id
            else:
                continue
            value = after.value if isinstance(after, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docs[name] = _one_line(value.value)
        out[node.name] = ClassDocs(summary=_one_line(ast.get_docstring(node) or ""), fields=docs)
    return out


def _one_line(text: str) -> str:
    return " ".join(inspect.cleandoc(text).split())


@dataclass(frozen=True)
class Leaf:
    """One settable key of the run config."""

    key: str  # dotted, e.g. "train.lr"; entries of a list of sections: "data.datasets[].path"
    section: str  # the dotted section holding it, e.g. "model.mvm"
    owner: type  # the dataclass declaring it
    name: str
    annotation: str  # as written in the schema, e.g. "int | None"
    type: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when the field has no default
    doc: str | None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _list_item_type(annotation: Any) -> Any:
    """The element type of ``list[X]`` (None for anything else)."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return item
    return None


def sections(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted section name, dataclass) of every section below ``cls``, depth first, in declaration order."""
    out: list[tuple[str, type]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out += [(key, annotation), *sections(annotation, key)]
        elif dataclasses.is_dataclass(item := _list_item_type(annotation)):
            out += [(f"{key}[]", item), *sections(item, f"{key}[]")]
    return out


def leaf_fields(cls: type = RunConfig, prefix: str = "") -> list[Leaf]:
    """Every leaf key below ``cls``: sections are walked into; a list of sections (``data.datasets``) is
    a leaf itself and its entries' fields are leaves too."""
    docs = _schema_docs()[cls.__name__].fields
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out += leaf_fields(annotation, key)
            continue
        leaf = Leaf(key, prefix, cls, f.name, str(f.type), annotation, _default(f), docs.get(f.name))
        out.append(leaf)
        if dataclasses.is_dataclass(item := _list_item_type(annotation)):
            out += leaf_fields(item, f"{key}[]")
    return out


def undocumented_fields() -> list[str]:
    """Keys of the leaves that have no docstring (empty when the schema is fully documented)."""
    return [leaf.key for leaf in leaf_fields() if not leaf.doc]


def undocumented_enum_values() -> list[str]:
    """``Enum.MEMBER`` of every value of a mode switch used by the config that has no docstring."""
    docs = _schema_docs()
    enums = {enum_cls for leaf in leaf_fields() if (enum_cls := enum_of(leaf.type)) is not None}
    return sorted(f"{e.__name__}.{m.name}" for e in enums for m in e if m.name not in docs[e.__name__].fields)


def enum_of(annotation: Any) -> type[enum.Enum] | None:
    """The enum class of an annotation such as ``Stage`` or ``Precision | None``."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

_HEADER = """\
# Run configuration reference

<!-- Generated from mks2/config/schema.py by `python -m mks2.config --reference --output docs/CONFIG.md`.
     Do not edit: change the docstrings in the schema and regenerate (tests/test_config.py checks). -->

A run config is a YAML file (`configs/*.yaml`; without `--config` the launchers use `configs/demo.yaml`)
merged with `key=value` overrides on the command line, e.g. `train.lr=2e-4 parallel.mode=pipeline`.
Every problem (unknown key, wrong type, bad value, impossible combination) is reported in one message.
"""


def _cell(text: str) -> str:
    """A docstring as Markdown table-cell text: reST double-backtick code spans become single-backtick ones
    and pipes are escaped."""
    return text.replace("``", "`").replace("|", "\\|")


def _show_default(value: Any) -> str:
    if value is dataclasses.MISSING or value == "???":
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _show_type(leaf: Leaf) -> str:
    enum_cls = enum_of(leaf.type)
    if enum_cls is None:
        return f"`{_cell(leaf.annotation)}`"
    optional = " or `null`" if type(None) in typing.get_args(leaf.type) else ""
    return f"[`{enum_cls.__name__}`](#{enum_cls.__name__.lower()}){optional}"


def config_reference() -> str:
    """The Markdown text of ``docs/CONFIG.md``."""
    docs = _schema_docs()
    by_section: dict[str, list[Leaf]] = {}
    for leaf in leaf_fields():
        by_section.setdefault(leaf.section, []).append(leaf)
    lines = [_HEADER]
    for name, cls in sections():
        if name not in by_section:
            continue
        lines += [f"## `{name}`", ""]
        if docs[cls.__name__].summary:
            lines += [_cell(docs[cls.__name__].summary), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for leaf in by_section[name]:
            row = (f"`{leaf.key}`", _show_type(leaf), _show_default(leaf.default), _cell(leaf.doc or ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Values of the mode switches", ""]
    seen: list[type[enum.Enum]] = []
    for leaf in leaf_fields():
        enum_cls = enum_of(leaf.type)
        if enum_cls is not None and enum_cls not in seen:
            seen.append(enum_cls)
    for enum_cls in seen:
        users = ", ".join(f"`{leaf.key}`" for leaf in leaf_fields() if enum_of(leaf.type) is enum_cls)
        lines += [f"### {enum_cls.__name__}", "", f"Used by {users}.", "", "| value | meaning |", "|---|---|"]
        member_docs = docs[enum_cls.__name__].fields
        lines += [f"| `{m.value}` | {_cell(member_docs.get(m.name, ''))} |" for m in enum_cls]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
