"""The pipeline layout (mks2.model.pipeline_layout): the on-disk layer table, the key map of both
stages' pipeline modules in both directions, and the stage split of L decoder layers over P stages."""

from __future__ import annotations

import pytest

from mks2.model.pipeline_layout import LayerKind, PipelineLayout
from mks2.training.pipeline import DecoderLayerPipe, EmbedPipe, ModelSource
from mks2.training.stage1 import Stage1HeadPipe
from mks2.training.stage2 import SFTHeadPipe
from tests.fixtures import make_tiny_llama_and_clip
from tests.model.model_helpers import build

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_tiny_llama_and_clip(tmp_path_factory, num_hidden_layers=NUM_LAYERS)


def test_layer_table_is_the_one_on_disk():
    """Layer file numbers and key prefixes of pipeline checkpoints written so far: must never change."""
    layout = PipelineLayout(NUM_LAYERS)
    assert len(layout) == NUM_LAYERS + 2
    assert [layer.kind for layer in layout.layers] == [LayerKind.EMBED, *[LayerKind.DECODER] * 3, LayerKind.HEAD]
    assert [layer.index for layer in layout.layers] == [0, 1, 2, 3, 4]
    assert layout.layer(0).key_prefixes == ("embed_tokens.", "vision.")
    assert layout.layer(2).key_prefixes == ("layer.",)
    assert layout.layer(4).key_prefixes == ("norm.", "lm_head.", "retrieval.")
    pinned = {
        (0, "embed_tokens.weight"): "model.embed_tokens.weight",
        (0, "vision.mapping.weight"): "vision.mapping.weight",
        (1, "layer.self_attn.q_proj.weight"): "model.layers.0.self_attn.q_proj.weight",
        (3, "layer.mvm.down_proj.weight"): "model.layers.2.mvm.down_proj.weight",
        (4, "norm.weight"): "model.norm.weight",
        (4, "lm_head.weight"): "lm_head.weight",
        (4, "retrieval.logit_scale"): "retrieval.logit_scale",
    }
    for (index, key), name in pinned.items():
        assert layout.model_key(index, key) == name
        assert layout.pipe_key(name) == (index, key)
    assert layout.model_key(0, "layer.mlp.up_proj.weight") is None
    assert layout.model_key(4, "embed_tokens.weight") is None
    assert layout.pipe_key("somewhere.else") is None
    assert PipelineLayout(12).pipe_key("model.layers.1.mlp.up_proj.weight") == (2, "layer.mlp.up_proj.weight")
    with pytest.raises(IndexError, match="outside 0..4"):
        layout.layer(5)


def _pipe_modules(model, head):
    """The pipeline module of every layout layer, built the way the LayerSpecs build them."""
    layout = PipelineLayout(len(model.model.layers))
    source = ModelSource(model)
    classes = {LayerKind.EMBED: EmbedPipe, LayerKind.DECODER: DecoderLayerPipe, LayerKind.HEAD: head}
    return layout, [classes[layer.kind](source, layer) for layer in layout.layers]


@pytest.mark.parametrize(
    ("stage", "head", "head_modules"),
    [("mvm", Stage1HeadPipe, {"norm", "lm_head", "retrieval"}), ("mome", SFTHeadPipe, {"norm", "lm_head"})],
)
def test_key_map_round_trip_for_both_stages(dirs, stage, head, head_modules):
    """Every state-dict key of every pipeline module maps to the model's own tensor and back; together
    the layers hold each of the model's tensors exactly once."""
    llama, clip = dirs
    model = build(llama, f"model.stage={stage}", vision_dir=clip)
    own = model.state_dict(keep_vars=True)
    layout, modules = _pipe_modules(model, head)
    expected_children = [{"embed_tokens", "vision"}, *[{"layer"}] * NUM_LAYERS, head_modules]
    assert [set(dict(m.named_children())) for m in modules] == expected_children
    seen: dict[str, int] = {}
    for layer, module in zip(layout.layers, modules, strict=True):
        for key, tensor in module.state_dict(keep_vars=True).items():
            name = layout.model_key(layer.index, key)
            assert name is not None and name not in seen, (layer.index, key, name)
            assert own[name] is tensor, (layer.index, key, name)
            assert layout.pipe_key(name) == (layer.index, key)
            seen[name] = layer.index
    assert set(seen) == set(own)
    assert all(seen[f"model.layers.{i}.self_attn.q_proj.weight"] == i + 1 for i in range(NUM_LAYERS))


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "bounds"),
    [(3, 1, [0, 5]), (4, 2, [0, 3, 6]), (4, 3, [0, 3, 4, 6]), (5, 2, [0, 4, 7]), (12, 5, [0, 4, 7, 9, 11, 14]),
     (32, 4, [0, 9, 17, 25, 34]), (40, 6, [0, 8, 15, 22, 29, 35, 42])],
)  # fmt: skip
def test_stage_bounds(num_layers, num_stages, bounds):
    layout = PipelineLayout(num_layers)
    assert layout.stage_bounds(num_stages) == bounds
    held = [layout.stage_layers(s, num_stages) for s in range(num_stages)]
    assert [i for r in held for i in r] == list(range(num_layers + 2))  # every layer on exactly one stage
    decoders = [sum(1 for i in r if 1 <= i <= num_layers) for r in held]
    assert max(decoders) - min(decoders) <= 1 and decoders == sorted(decoders, reverse=True)


def test_stage_bounds_errors():
    with pytest.raises(ValueError, match="cannot split 3 decoder layers over 4"):
        PipelineLayout(3).stage_bounds(4)
    with pytest.raises(ValueError, match="cannot split"):
        PipelineLayout(3).stage_bounds(0)
    with pytest.raises(ValueError, match="at least one decoder layer"):
        PipelineLayout(0)


def test_stage_bounds_equal_the_former_deepspeed_type_partition():
    """Runs written before our own split used ``partition_method="type:DecoderLayerPipe"``: DeepSpeed's
    balanced partition of the weights [0, 1 x L, 0]. Same split, so their optimizer files still fit."""
    from deepspeed.runtime.utils import partition_balanced

    cases = [(n, p) for n in range(1, 13) for p in range(1, n + 1)] + [(32, p) for p in (2, 3, 5, 8)]
    for num_layers, num_stages in cases:
        theirs = [int(b) for b in partition_balanced([0] + [1] * num_layers + [0], num_stages)]
        assert PipelineLayout(num_layers).stage_bounds(num_stages) == theirs, (num_layers, num_stages)


def test_only_decoder_layers_are_activation_checkpointed(dirs):
    from mks2.training.pipeline_module import LayoutPipelineModule

    llama, clip = dirs
    model = build(llama, "model.stage=mvm", vision_dir=clip)
    _, (embed, *decoders, head) = _pipe_modules(model, Stage1HeadPipe)
    checkpointable = LayoutPipelineModule._is_checkpointable  # reads nothing of the module itself
    assert checkpointable(None, decoders[:2])
    assert not checkpointable(None, [embed, decoders[0]])
    assert not checkpointable(None, [decoders[-1], head])


def test_a_template_partition_method_is_dropped_with_a_note(tmp_path):
    import json

    from mks2.config import load_config
    from mks2.training.ds_config import build_ds_config

    template = tmp_path / "pipe.json"
    template.write_text(json.dumps({"pipeline": {"partition": "parameters", "pipe_partitioned": True}}))
    cfg = load_config(None, ["parallel.mode=pipeline", "parallel.pipeline_stages=2", f"parallel.ds_config={template}"])
    ds, notes = build_ds_config(cfg, data_parallel_size=1, use_torch_adam=True)
    assert "partition" not in ds["pipeline"] and ds["pipeline"]["pipe_partitioned"] is True
    assert any("pipeline.partition='parameters' ignored" in n for n in notes), notes
    bundled = load_config(None, ["parallel.mode=pipeline", "parallel.pipeline_stages=2"])
    assert not any("partition" in n for n in build_ds_config(bundled, data_parallel_size=1, use_torch_adam=True)[1])
