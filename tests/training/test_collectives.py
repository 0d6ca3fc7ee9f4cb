"""NCCL takes only tensors on the rank's own accelerator; gloo takes CPU tensors too, so CPU runs cannot show
a collective on the wrong device. Two guards, both in-process:

- no module of the package calls a ``torch.distributed`` (or ``deepspeed.comm``) collective except
  ``mks2.training.distributed``, the one helper that places tensors on the collective device;
- with the collective device pretended to be ``meta`` (any device other than the CPU the model is built
  on would do), ``torch.distributed``'s collectives are replaced by fakes of a 2-rank world that fail on
  any tensor not on that device, and the package's collective call sites run through them. This catches,
  e.g., stage-1 weights broadcast from a model built on the CPU (the pipeline-mode crash under NCCL: run
  this file against commit c008c84 and ``test_stage1_weights_reach_no_collective_off_device`` fails there
  at ``dist.broadcast(param.data)``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mks2 import build_model
from mks2.checkpoint.tensors import ModuleSource
from mks2.model.pipeline_layout import PipelineLayout
from mks2.training import distributed, from_stage1
from tests import tiny

PACKAGE = Path(__file__).resolve().parents[2] / "mks2"
HELPER = PACKAGE / "training" / "distributed.py"
COLLECTIVES = {
    "broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "broadcast_object_list",
    "all_gather_object", "gather_object", "scatter_object_list", "barrier", "monitored_barrier", "send", "recv",
    "isend", "irecv", "batch_isend_irecv",
}  # fmt: skip
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def _direct_collective_calls(path: Path) -> list[str]:
    """``file:line name`` of every collective called through an alias of torch.distributed/deepspeed.comm,
    through the full dotted name, or imported by name from those modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in COMM_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            target = ast.unparse(node.func.value)
            if target in aliases or target in COMM_MODULES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {target}.{node.func.attr}")
    return found


def test_no_module_but_the_helper_calls_a_collective():
    offenders = [hit for f in sorted(PACKAGE.rglob("*.py")) if f != HELPER for hit in _direct_collective_calls(f)]
    assert not offenders, "collectives outside mks2.training.distributed:\n" + "\n".join(offenders)


def test_the_scan_sees_aliases_and_dotted_calls(tmp_path):
    probe = PACKAGE / "_probe_collectives.py"  # inside the package so relative_to works; removed below
    probe.write_text(
        "import torch.distributed as d\nimport torch\nfrom torch.distributed import all_reduce\n"
        "d.broadcast(x, 0)\ntorch.distributed.all_gather(a, b)\n"
    )
    try:
        hits = _direct_collective_calls(probe)
    finally:
        probe.unlink()
    assert len(hits) == 3, hits


# --------------------------------------------------------------------------------------------
# every tensor of a collective on the collective device
# --------------------------------------------------------------------------------------------

EXPECTED = torch.device("meta")


class FakeWorld:
    """Rank 0 of a 2-rank world whose collectives accept only tensors on ``EXPECTED``."""

    def __init__(self):
        self.calls: list[str] = []

    def _check(self, what: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            assert t.device == EXPECTED, f"{what} got a tensor on {t.device}, the collective device is {EXPECTED}"
        self.calls.append(what)

    def broadcast(self, t, src=0, group=None, async_op=False, **_):
        self._check("broadcast", t)

    def all_reduce(self, t, op=None, group=None, async_op=False, **_):
        self._check("all_reduce", t)

    def all_gather(self, parts, t, group=None, async_op=False, **_):
        self._check("all_gather", t, *parts)

    def broadcast_object_list(self, objects, src=0, group=None, device=None, **_):
        # device None: torch uses the current accelerator device (set at start-up); one given must be ours
        assert device is None or torch.device(device) == EXPECTED, f"broadcast_object_list on {device}"
        self.calls.append("broadcast_object_list")

    def all_gather_object(self, out, obj, group=None, **_):
        out[:] = [obj] * len(out)
        self.calls.append("all_gather_object")

    def barrier(self, *a, **k):
        self.calls.append("barrier")


@pytest.fixture
def fake_world(monkeypatch) -> FakeWorld:
    world = FakeWorld()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    for name in ("broadcast", "all_reduce", "all_gather", "broadcast_object_list", "all_gather_object", "barrier"):
        monkeypatch.setattr(dist, name, getattr(world, name))
    monkeypatch.setattr(distributed, "collective_device", lambda: EXPECTED, raising=False)
    # Results cannot be copied out of meta tensors: hand back zeros of the caller's device instead.
    monkeypatch.setattr(distributed, "_copy_back", lambda dst, src: None, raising=False)
    monkeypatch.setattr(
        distributed, "_to", lambda t, device: torch.zeros(t.shape, dtype=t.dtype, device=device), raising=False
    )
    return world


def _stage2_model(seed: int = 0, **build):
    torch.manual_seed(seed)
    return build_model(tiny.run_config("model.stage=mome"), **build)


def test_stage1_weights_reach_no_collective_off_device(fake_world, monkeypatch):
    """Pipeline mode (no weight_gather): a stage-local model, built on the CPU, loads its stage-1 tensors;
    no tensor reaches a collective off the collective device (today's code broadcasts none at all)."""
    layout = PipelineLayout(2)
    keep = {path for i in layout.stage_layers(1, 2) for _, path in layout.layer(i).modules}
    model = _stage2_model(keep=keep)
    source_model = _stage2_model(seed=1)
    monkeypatch.setattr(from_stage1, "open_stage1", lambda source: ModuleSource(source_model))
    source = from_stage1.Stage1Source(save_dir=Path("/nonexistent"), tag="step_1", config={}, trainer={})
    loaded = from_stage1.load_stage1_weights(model, source)
    params = dict(model.named_parameters())
    expected = dict(source_model.named_parameters())
    assert loaded and all(not params[n].is_meta and torch.equal(params[n], expected[n]) for n in loaded)
    assert "model.layers.1.mlp.up_proj.weight" in loaded and "model.embed_tokens.weight" not in loaded
    assert "all_gather_object" in fake_world.calls or "broadcast_object_list" in fake_world.calls


def test_helper_collectives_place_tensors_on_the_collective_device(fake_world):
    x = torch.randn(3, 4, requires_grad=True)
    gathered = distributed.all_gather_with_grad(x)
    assert gathered.shape == (6, 4) and gathered.device == x.device
    gathered.sum().backward()  # backward all-reduces the gradient: on the collective device too
    assert x.grad.shape == x.shape
    assert distributed.all_gather_no_grad(torch.ones(2, 2)).shape == (4, 2)
    distributed.broadcast(torch.ones(3))
    distributed.all_reduce(torch.ones(3), op=distributed.ReduceOp.MAX)
    distributed.broadcast_object_list([1])
    assert distributed.all_gather_object("x") == ["x", "x"]
    assert {"all_gather", "all_reduce", "broadcast", "broadcast_object_list"} <= set(fake_world.calls)


def test_engine_group_count_agreement_reaches_the_collective_device(fake_world):
    from mks2.training.engine import _same_group_count_on_every_stage

    groups = [{"params": [torch.nn.Parameter(torch.ones(2, 2))], "weight_decay": 0.1}]
    assert _same_group_count_on_every_stage(groups, 0.1) is groups
    assert fake_world.calls == ["all_reduce"]


def test_the_device_check_bites(fake_world):
    """The fakes refuse a CPU tensor handed to torch.distributed directly (what the helper prevents)."""
    with pytest.raises(AssertionError, match="collective device is meta"):
        dist.broadcast(torch.ones(2), src=0)
