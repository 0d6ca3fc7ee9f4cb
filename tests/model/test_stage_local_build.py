"""Stage-local builds (pipeline mode): ``build_model(keep=...)`` materialises and reads only one stage's
pieces, and each of them equals the same slice of a full build (HF-loaded and randomly initialised tensors
alike, because the RNG advances as in a full build); everything else stays on the meta device, unread."""

from __future__ import annotations

import pytest
import torch

from mks2 import build_model
from mks2.model import hf_loading
from mks2.model.pipeline_layout import PipelineLayout
from tests import tiny
from tests.fixtures import make_tiny_clip, make_tiny_llama


def _stage_paths(num_layers: int, stage: int, stages: int) -> set[str]:
    layout = PipelineLayout(num_layers)
    return {path for i in layout.stage_layers(stage, stages) for _, path in layout.layer(i).modules}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=False))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    llama, clip = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("clip")
    make_tiny_llama(llama, num_hidden_layers=4)
    make_tiny_clip(clip)
    return llama, clip


@pytest.mark.parametrize("stage_name", ["mvm", "mome"])
@pytest.mark.parametrize("stages", [2, 3])
def test_stage_local_build_equals_the_slice_of_a_full_build(dirs, monkeypatch, stage_name, stages):
    llama, clip = dirs
    overrides = [f"model.stage={stage_name}", "model.mvm.layers=all"]

    def cfg():
        return tiny.run_config(*overrides, llama_dir=llama, vision_dir=clip, tiny_shape=False)

    torch.manual_seed(7)
    full = _state(build_model(cfg()))
    reads: list = []  # (file, entry) of every safetensors tensor read
    real_read = hf_loading.read_safetensors_into
    monkeypatch.setattr(
        hf_loading, "read_safetensors_into", lambda f, e, out: (reads.append((f, e)), real_read(f, e, out))[1]
    )
    seen: set[str] = set()
    for stage in range(stages):
        keep = _stage_paths(4, stage, stages)
        reads.clear()
        torch.manual_seed(7)
        model = build_model(cfg(), keep=keep)
        local = {n: t for n, t in _state(model).items() if not t.is_meta}
        for name, tensor in _state(model).items():
            owned = any(name.startswith(f"{p}.") for p in keep) or name.startswith("model.rotary_emb")
            assert tensor.is_meta != owned, (stage, name)
        for name, tensor in local.items():
            assert torch.equal(tensor, full[name]), (stage, name)
        # Only this stage's HF tensors were read (the LLM's; the vision tower is read by stage 0 only).
        llm_local = [n for n, p in hf_loading.llama_parameters(model).items() if not p.is_meta]
        from_llama = [e for f, e in reads if f.parent == llama]
        from_clip = [e for f, e in reads if f.parent == clip]
        assert len(from_llama) == len(llm_local), (stage, len(from_llama), len(llm_local))
        assert bool(from_clip) == (stage == 0)
        seen |= set(local)
        if stage != 0:
            assert all(p.is_meta for p in model.vision.parameters())
    assert seen == set(full)  # every tensor of the full model lives on exactly one stage (or everywhere)
