"""Stage invariants of DESIGN §1: mvm == base at init, exact trainable splits, MoME gates, LoRA merge."""

from __future__ import annotations

import pytest
import torch

from mks2.config import ConfigError
from mks2.model import merge_lora, parameter_summary
from mks2.model.summary import parameter_counts
from tests.fixtures import make_tiny_llama_and_clip
from tests.model.model_helpers import build, random_ids, randomize_lora_, run_config

ATOL = 1e-5
NUM_LAYERS = 3
PROJ = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_tiny_llama_and_clip(tmp_path_factory, num_hidden_layers=NUM_LAYERS)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# --------------------------------------------------------------------------------------------
# mvm at init == base
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["replace", "parallel"])
@pytest.mark.parametrize("layers", ["all", "every:2", "[1]"])
def test_mvm_at_init_equals_base(dirs, placement, layers):
    llama, clip = dirs
    base = build(llama, "model.stage=base")
    mvm = build(llama, "model.stage=mvm", f"model.mvm.placement={placement}", f"model.mvm.layers={layers}",
                vision_dir=clip)  # fmt: skip
    expected = {"all": [0, 1, 2], "every:2": [0, 2], "[1]": [1]}[layers]
    assert [i for i, layer in enumerate(mvm.model.layers) if layer.has_mvm] == expected
    layer = mvm.model.layers[expected[0]]
    if placement == "replace":
        assert torch.equal(layer.mvm.up_proj.weight, layer.mlp.up_proj.weight)
        assert layer.mvm.up_proj.weight.data_ptr() != layer.mlp.up_proj.weight.data_ptr()  # a copy, not shared
    else:
        assert (layer.mvm.down_proj.weight == 0).all() and layer.mvm.up_proj.weight.abs().sum() > 0
    ids = random_ids(2, 20)
    torch.testing.assert_close(logits(mvm, ids), logits(base, ids), atol=ATOL, rtol=0)


def test_mvm_parallel_width_can_differ_and_replace_cannot(dirs):
    llama, clip = dirs
    mvm = build(llama, "model.stage=mvm", "model.mvm.placement=parallel", "model.mvm.intermediate_size=40",
                vision_dir=clip)  # fmt: skip
    assert mvm.model.layers[0].mvm.up_proj.weight.shape == (40, 32)
    base = build(llama, "model.stage=base")
    ids = random_ids(1, 16)
    torch.testing.assert_close(logits(mvm, ids), logits(base, ids), atol=ATOL, rtol=0)
    # replace + a different width: the config says why, naming both keys.
    with pytest.raises(ConfigError, match=r"model.mvm.intermediate_size \(40\) must equal model.intermediate_size"):
        run_config(None, "model.stage=mvm", "model.mvm.intermediate_size=40", vision_dir=clip)
    with pytest.raises(ConfigError, match="placement=replace"):
        run_config(None, "model.stage=mome", "model.mvm.intermediate_size=40")
    # The checkpoint's width (88) is only known after reading config.json: checked there too.
    with pytest.raises(
        ConfigError, match=r"model.mvm.intermediate_size \(176\) must equal model.intermediate_size \(88\)"
    ):
        build(llama, "model.stage=mvm", "model.mvm.intermediate_size=176", vision_dir=clip)


# --------------------------------------------------------------------------------------------
# trainable / frozen split
# --------------------------------------------------------------------------------------------


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def llm_names():
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(NUM_LAYERS):
        pre = f"model.layers.{i}"
        names |= {f"{pre}.input_layernorm.weight", f"{pre}.post_attention_layernorm.weight"}
        names |= {f"{pre}.self_attn.{p}.weight" for p in ATTN} | {f"{pre}.mlp.{p}.weight" for p in PROJ}
    return names


def test_trainable_split_base(dirs):
    model = build(dirs[0], "model.stage=base")
    assert trainable(model) == llm_names() == {n for n, _ in model.named_parameters()}


def test_trainable_split_mvm(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mvm", "model.mvm.layers=[0,2]", vision_dir=clip)
    expected = {f"model.layers.{i}.mvm.{p}.weight" for i in (0, 2) for p in PROJ}
    expected |= {"vision.mapping.weight", "vision.mapping.bias", "retrieval.proj.weight", "retrieval.logit_scale"}
    assert trainable(model) == expected
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert llm_names() <= frozen and any(n.startswith("vision.vision_model.") for n in frozen)


@pytest.mark.parametrize("targets", ["[mlp,mvm]", "[mlp,mvm,q_proj,v_proj]"])
def test_trainable_split_mome(dirs, targets):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", f"model.lora.targets={targets}", "model.mvm.layers=[1,2]",
                  vision_dir=clip)  # fmt: skip
    expected = {"vision.mapping.weight", "vision.mapping.bias"}
    for i in range(NUM_LAYERS):
        pre = f"model.layers.{i}"
        mods = [f"mlp.{p}" for p in PROJ] + [f"self_attn.{p}" for p in ATTN if p in targets]
        if i in (1, 2):
            mods += [f"mvm.{p}" for p in PROJ]
            expected.add(f"{pre}.router.weight")
        expected |= {f"{pre}.{m}.lora_{ab}" for m in mods for ab in "AB"}
    assert trainable(model) == expected
    assert model.retrieval is None and not hasattr(model.model.layers[0], "router")


def test_gradients_reach_exactly_the_trainable_parameters(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mvm", vision_dir=clip).train()
    ids = random_ids(2, 16)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    # The mapping gets a (zero) gradient even without images: every rank touches the same parameters.
    assert with_grad == trainable(model) - {"retrieval.proj.weight", "retrieval.logit_scale"}
    assert model.model.layers[0].mvm.up_proj.weight.grad.abs().sum() > 0


def test_parameter_summary_components(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", vision_dir=clip)
    counts = parameter_counts(model)
    d, inter, r = 32, 88, 16
    # gate, up: A [r, d] + B [inter, r] each; down: A [r, inter] + B [d, r]
    ffn_lora = 2 * (r * d + inter * r) + (r * inter + d * r)
    assert counts["lora"] == (2 * NUM_LAYERS * ffn_lora, 0)  # mlp + mvm adapters in every layer
    assert counts["router"] == (NUM_LAYERS * 2 * d, 0)
    assert counts["mvm"] == (0, NUM_LAYERS * 3 * d * inter)
    assert counts["mlp"] == (0, NUM_LAYERS * 3 * d * inter)
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"][0] + counts["total"][1] == total
    text = parameter_summary(model)
    for word in ("embeddings", "attention", "mlp", "mvm", "router", "lora", "vision", "head", "trainable share"):
        assert word in text


# --------------------------------------------------------------------------------------------
# MoME
# --------------------------------------------------------------------------------------------


def test_gates_sum_to_one_per_token(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.mome.router_init_std=0.5", vision_dir=clip)
    out = model(random_ids(2, 10))
    gates = out.aux["gates"]
    assert sorted(gates) == [0, 1, 2]
    for g in gates.values():
        assert g.shape == (2, 10, 2) and g.dtype == torch.float32
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 10))
        assert g.std() > 0  # non-uniform: the router is actually used


def test_layer_mixing_formula(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.mome.router_init_std=0.5", vision_dir=clip)
    randomize_lora_(model)
    layer = model.model.layers[1]
    u = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        e0, e1 = layer.mlp(u), layer.mvm(u)
        g = torch.softmax(u @ layer.router.weight.t(), -1)
        manual = g[..., :1] * e0 + g[..., 1:] * e1
        mixed, gates = layer.ffn(u)
        torch.testing.assert_close(mixed, manual, atol=1e-6, rtol=0)
        torch.testing.assert_close(gates, g)
        layer.router.force_gates([1.0, 0.0])
        torch.testing.assert_close(layer.ffn(u)[0], e0, atol=1e-6, rtol=0)
        layer.router.force_gates([0.0, 1.0])
        torch.testing.assert_close(layer.ffn(u)[0], e1, atol=1e-6, rtol=0)
        layer.router.force_gates(None)
    with pytest.raises(ValueError, match="forced gates must be 2 finite numbers"):
        layer.router.force_gates([1.0])


def test_uniform_router_gives_mean_of_experts(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.mome.router_init_std=0", vision_dir=clip)
    randomize_lora_(model)
    assert all((layer.router.weight == 0).all() for layer in model.model.layers)
    ids = random_ids(2, 12)
    routed = logits(model, ids)
    with model.forced_gates([0.5, 0.5]):
        forced = logits(model, ids)
    torch.testing.assert_close(routed, forced, atol=ATOL, rtol=0)
    u = torch.randn(1, 4, 32)
    layer = model.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(layer.ffn(u)[0], 0.5 * (layer.mlp(u) + layer.mvm(u)), atol=1e-6, rtol=0)


def test_forcing_mlp_gate_equals_model_without_moe(dirs):
    """Gate (1, 0) in every layer = the 'w/o MoMEs' ablation (MLP + LoRA only) with the same weights."""
    llama, clip = dirs
    mome = build(llama, "model.stage=mome", "model.mome.router_init_std=0.5", vision_dir=clip)
    randomize_lora_(mome, seed=1)
    ablation = build(llama, "model.stage=mome", "model.mome.use_mvm=false", vision_dir=clip)
    assert not any(hasattr(layer, "mvm") or hasattr(layer, "router") for layer in ablation.model.layers)
    missing, unexpected = ablation.load_state_dict(mome.state_dict(), strict=False)
    assert not missing and all(".mvm." in k or ".router." in k for k in unexpected)
    ids = random_ids(2, 12)
    assert not torch.allclose(logits(mome, ids), logits(ablation, ids), atol=1e-3)
    with mome.forced_gates([1.0, 0.0]):
        torch.testing.assert_close(logits(mome, ids), logits(ablation, ids), atol=ATOL, rtol=0)


def test_fresh_mome_from_hf_equals_base(dirs):
    """Replace placement: MVM = copy of MLP, LoRA B = 0, so any gates give the base model."""
    llama, clip = dirs
    mome = build(llama, "model.stage=mome", "model.mome.router_init_std=0.5", vision_dir=clip)
    base = build(llama, "model.stage=base")
    ids = random_ids(2, 12)
    torch.testing.assert_close(logits(mome, ids), logits(base, ids), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


def test_merge_lora_keeps_outputs(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.lora.targets=[mlp,mvm,q_proj,k_proj,v_proj,o_proj]",
                  "model.mome.router_init_std=0.5", vision_dir=clip)  # fmt: skip
    n = randomize_lora_(model, std=0.1)
    assert n == 2 * NUM_LAYERS * (3 + 3 + 4)
    ids = random_ids(2, 14)
    before = logits(model, ids)
    base = build(llama, "model.stage=base")
    assert (before - logits(base, ids)).abs().max() > 1e-2  # adapters really change the function
    merged = merge_lora(model)
    assert len(merged) == NUM_LAYERS * (3 + 3 + 4)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), before, atol=ATOL, rtol=0)


def test_lora_scaling_and_dropout(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.5",
                  vision_dir=clip)  # fmt: skip
    proj = model.model.layers[0].mlp.up_proj
    assert proj.lora_A.shape == (4, 32) and proj.lora_B.shape == (88, 4) and proj.lora_scaling == 2.0
    assert (proj.lora_B == 0).all() and proj.lora_A.abs().sum() > 0
    randomize_lora_(model)
    x = torch.randn(3, 32)
    with torch.no_grad():
        proj.eval()
        manual = x @ proj.weight.t() + 2.0 * (x @ proj.lora_A.t() @ proj.lora_B.t())
        torch.testing.assert_close(proj(x), manual, atol=1e-6, rtol=0)
        proj.train()
        assert not torch.allclose(proj(x), manual)  # dropout on the adapter input in training


def test_activation_checkpointing_gives_identical_gradients(dirs):
    llama, clip = dirs
    model = build(llama, "model.stage=mome", "model.mome.router_init_std=0.5", vision_dir=clip).train()
    randomize_lora_(model)
    ids = random_ids(2, 12)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)
