"""HF loader: architecture from config.json, clear errors naming tensors/files, the weight_gather hook."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mks2.config import ConfigError
from mks2.model import HFCheckpointError, apply_config_from_hf, build_model, load_hf_llama
from mks2.model.modeling import MKS2ForCausalLM
from tests.fixtures import make_tiny_clip
from tests.model.model_helpers import build, random_ids, run_config, tiny_llama


@pytest.fixture()
def llama(tmp_path):
    d = tmp_path / "llama"
    hf = tiny_llama(d)
    return d, hf


def edit_weights(directory, fn):
    file = directory / "model.safetensors"
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})


def test_architecture_comes_from_config_json(llama):
    d, _ = llama
    cfg = run_config(None, "model.hidden_size=4096", "model.num_layers=32")
    apply_config_from_hf(cfg, d)
    m = cfg.model
    got = (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads)
    assert got == (128, 32, 88, 2, 4, 2)
    assert (m.max_position_embeddings, m.rms_norm_eps, m.rope_theta, m.rope_scaling) == (128, 1e-5, 10000.0, None)
    assert m.tie_word_embeddings is False


def test_transformers4_style_config_json(llama):
    """Llama-2 releases carry rope_theta / rope_scaling at top level (no rope_parameters)."""
    d, _ = llama
    raw = json.loads((d / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}, pretraining_tp=1)
    (d / "config.json").write_text(json.dumps(raw))
    cfg = apply_config_from_hf(run_config(None), d)
    assert cfg.model.rope_theta == 500000.0
    assert dict(cfg.model.rope_scaling) == {"rope_type": "linear", "factor": 4.0}


def test_config_json_problems_are_listed(tmp_path, llama):
    d, _ = llama
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="mistral", hidden_act="gelu", attention_bias=True)
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        apply_config_from_hf(run_config(None), d)
    msg = str(err.value)
    assert str(d / "config.json") in msg
    assert "model_type is 'mistral'" in msg and "hidden_act is 'gelu'" in msg and "attention_bias" in msg
    with pytest.raises(ValueError, match="has no config.json"):
        apply_config_from_hf(run_config(None), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        apply_config_from_hf(run_config(None), tmp_path / "nope")


def test_architecture_revalidated_after_reading_checkpoint(llama):
    d, _ = llama
    # seq_len 200 fits the YAML default (4096 positions) but not this checkpoint's 128.
    with pytest.raises(ConfigError, match=r"data.seq_len \(200\) exceeds model.max_position_embeddings \(128\)"):
        build_model(run_config(d, "data.seq_len=200"))


def test_missing_tensor_is_named(llama):
    d, _ = llama
    edit_weights(d, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFCheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight") as err:
        build(d, "model.stage=base")
    assert str(d) in str(err.value)


def test_unexpected_tensor_is_named_with_its_file(llama):
    d, _ = llama
    edit_weights(d, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        HFCheckpointError, match=r"unexpected 1 tensor\(s\): model.layers.0.mlp.extra.weight \(in model.safetensors\)"
    ):  # noqa: E501
        build(d, "model.stage=base")


def test_old_rotary_buffers_are_ignored(llama):
    d, hf = llama
    edit_weights(d, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    model = build(d, "model.stage=base")
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_misshaped_tensor_is_named_with_its_file(llama):
    d, _ = llama
    edit_weights(d, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(HFCheckpointError) as err:
        build(d, "model.stage=base")
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "(8, 32)" in msg and "(16, 32)" in msg
    assert str(d / "model.safetensors") in msg


def test_broken_index_and_empty_directory(tmp_path, llama):
    d, hf = llama
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    next(iter(sorted(sharded.glob("model-0000*.safetensors")))).unlink()
    with pytest.raises(HFCheckpointError, match="lists shard file.* that do not exist"):
        build(sharded, "model.stage=base")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="no weights found"):
        build(empty, "model.stage=base")


class RecordingGather:
    """Stand-in for DeepSpeed's GatheredParameters: records which parameters each copy opened."""

    def __init__(self):
        self.calls: list[list[torch.nn.Parameter]] = []
        self.depth = 0

    def __call__(self, params):
        self.calls.append(list(params))

        @contextlib.contextmanager
        def ctx():
            self.depth += 1
            yield
            self.depth -= 1

        return ctx()


def test_weight_gather_wraps_every_copy(tmp_path, llama):
    d, _ = llama
    clip = tmp_path / "clip"
    make_tiny_clip(clip)
    gather = RecordingGather()
    model = build_model(run_config(d, "model.stage=mvm", vision_dir=clip), weight_gather=gather)
    llama_params = [
        n for n, _ in model.named_parameters() if not n.startswith(("vision.", "retrieval.")) and ".mvm." not in n
    ]
    by_id = {id(p): n for n, p in model.named_parameters()}
    gathered = [[by_id[id(p)] for p in call] for call in gather.calls]
    singles = {c[0] for c in gathered if len(c) == 1}
    assert set(llama_params) <= singles  # one gather per loaded tensor
    # MVM replace-init copies through the hook too, gathering source and destination together.
    mvm_copies = [c for c in gathered if len(c) == 2]
    assert len(mvm_copies) == 2 * 3
    assert all(".mlp." in src and ".mvm." in dst for src, dst in mvm_copies)
    assert gather.depth == 0


def test_load_hf_llama_into_existing_model(llama):
    d, hf = llama
    cfg = apply_config_from_hf(run_config(None, "model.stage=base"), d)
    model = MKS2ForCausalLM(cfg.model).eval()
    loaded = load_hf_llama(model, d, progress=False)
    assert len(loaded) == len(hf.state_dict())
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
