"""How the suite splits over pytest-xdist workers (CI runs ``pytest -n 2 --dist loadgroup
--no-loadscope-reorder``; see the README's test command).

Most tests run anywhere, one at a time. Three kinds must stay together on one worker, because what they
share is built once per worker:

- the session-wide training runs (``tests/conftest.py``: stage-1/stage-2 runs that the stage-2, export
  and accounting tests read; ``tests/training/conftest.py``: the 20-step resume references), ~20-40 s
  each on 2 cores: every test that uses one joins that run's group;
- a module-scoped fixture (a built model, an export): the module's tests form one group, joined to a
  training-run group when one of them is in it, so the module fixture is not built on both workers.

The groups are queued heaviest first (the runs, then the multi-process ``slow`` tests, then the rest), so
the long units start early and the short ones fill in at the end (xdist hands out units in this order)."""

from __future__ import annotations

import pytest

RUN_GROUPS = {
    "zero3_reference": "runs-resume",
    "pipeline_reference": "runs-resume",
    "stage1_zero3": "runs-stages",
    "stage1_pipeline": "runs-stages",
    "stage2_zero3": "runs-stages",
}
RANK = {"runs-resume": 0, "runs-stages": 1}


def _module_scoped(item: pytest.Item) -> bool:
    defs = getattr(item, "_fixtureinfo", None)
    if defs is None:
        return False
    return any(d.scope == "module" for fixture in defs.name2fixturedefs.values() for d in fixture)


def assign_groups(items: list[pytest.Item]) -> dict[str, str | None]:
    """nodeid -> xdist group (None: a unit of its own)."""
    group: dict[str, str | None] = {}
    module_run: dict[str, str] = {}
    for item in items:
        runs = sorted({RUN_GROUPS[n] for n in item.fixturenames if n in RUN_GROUPS}, key=RANK.get)
        group[item.nodeid] = runs[0] if runs else None
        if runs:
            module_run.setdefault(item.nodeid.split("::")[0], runs[0])
    for item in items:
        module = item.nodeid.split("::")[0]
        if group[item.nodeid] is None and _module_scoped(item):
            group[item.nodeid] = module_run.get(module, f"module-{module}")
    return group


def order_for_workers(items: list[pytest.Item]) -> None:
    """Mark each item with its group and sort the collection heaviest units first (stable otherwise)."""
    group = assign_groups(items)

    def rank(index_item: tuple[int, pytest.Item]) -> tuple[int, int]:
        index, item = index_item
        g = group[item.nodeid]
        if g in RANK:
            return RANK[g], index
        return (2 if item.get_closest_marker("slow") else 3), index

    for item in items:
        if group[item.nodeid] is not None:
            item.add_marker(pytest.mark.xdist_group(group[item.nodeid]))
    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]
