"""Single-process stage-2 tests: the MoME layer against DESIGN §1's formula, the trainable split, loading a
stage-1 checkpoint of either parallel mode, config adoption, data selection, ablation presets, and the
text-only micro-batch that still runs the trainable mapping (ZeRO-3 rule)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from mks2 import checkpoint as ckpt
from mks2.config import ConfigError, SFTData, bundled_config, load_config
from mks2.demo import resolve
from mks2.model.decoder import DecoderLayer
from mks2.training.ablations import ABLATIONS, ablation_overrides, check_ablation
from mks2.training.from_stage1 import adopt_stage1_config, locate_stage1, wanted_from_stage1
from mks2.training.stage2 import SFTObjective, Stage2Task, select_sft_datasets, vision_features

DEMO_STAGE2 = bundled_config("demo_stage2.yaml")


# --------------------------------------------------------------------------------------------
# The MoME layer (DESIGN §1): h + sum_e g_e(u) E_e(u), E_0 = MLP + LoRA, E_1 = MVM + LoRA, g = softmax(W_r u)
# --------------------------------------------------------------------------------------------


def _mome_layer(router_std: float = 0.0) -> DecoderLayer:
    cfg = load_config(
        None,
        ["model.stage=mome", "model.vision.kind=none", "model.hidden_size=32", "model.intermediate_size=48",
         "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=1", "model.lora.rank=4",
         "model.lora.alpha=8", "model.lora.dropout=0.0", f"model.mome.router_init_std={router_std}"],
    )  # fmt: skip
    torch.manual_seed(0)
    layer = DecoderLayer(cfg.model, 0).double().eval()
    with torch.no_grad():  # every weight random and the two experts different; LoRA B non-zero
        for name, p in layer.named_parameters():
            if "norm" not in name and "router" not in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return layer


def _swiglu_with_lora(expert, u: torch.Tensor) -> torch.Tensor:
    """The formula written out: W' = W + (alpha / r) B A for each projection, then down(silu(gate u) * up u)."""

    def w(lin):
        return lin.weight + lin.lora_scaling * lin.lora_B @ lin.lora_A

    return F.linear(F.silu(F.linear(u, w(expert.gate_proj))) * F.linear(u, w(expert.up_proj)), w(expert.down_proj))


@pytest.mark.parametrize("router_std", [0.0, 0.5])
def test_mome_layer_equals_design_formula(router_std):
    layer = _mome_layer(router_std)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pos = torch.arange(5).expand(2, 5)
    out, gates = layer(x, pos)
    with torch.no_grad():
        attn = layer.attention_context(x, pos, None)
        h = x + layer.self_attn(layer.input_layernorm(x), attn)
        u = layer.post_attention_layernorm(h)
        g = torch.softmax(u @ layer.router.weight.t(), dim=-1)  # [B, S, 2]
        expected = h + g[..., :1] * _swiglu_with_lora(layer.mlp, u) + g[..., 1:] * _swiglu_with_lora(layer.mvm, u)
    assert torch.allclose(gates.double(), g, atol=1e-7, rtol=0)  # gates are computed in fp32
    assert torch.allclose(gates.sum(-1), torch.ones(2, 5, dtype=gates.dtype))
    if router_std == 0.0:
        assert torch.equal(gates, torch.full_like(gates, 0.5))  # uniform router: exactly 1/2 each
        assert torch.allclose(out, h + 0.5 * _swiglu_with_lora(layer.mlp, u) + 0.5 * _swiglu_with_lora(layer.mvm, u),
                              atol=1e-12, rtol=0)  # fmt: skip
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)  # fp32 gates on fp64 experts


# --------------------------------------------------------------------------------------------
# Loading a stage-1 checkpoint
# --------------------------------------------------------------------------------------------


def stage2_config(stage1: dict, *overrides: str):
    cfg = load_config(
        DEMO_STAGE2,
        [f"model.init_from_stage1={stage1['save_dir']}", f"data.cache_dir={stage1['cache']}", "model.lora.dropout=0",
         *overrides],
    )  # fmt: skip
    return resolve(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "pipeline"])
def test_stage1_checkpoint_loads_with_the_stage2_split(mode, request):
    """Either mode's stage-1 checkpoint: MVM + mapping + (random-init run) base come from it, the retrieval
    head is dropped, LoRA/router are fresh, and only LoRA, routers and the mapping train."""
    from mks2.checkpoint import load_consolidated

    stage1 = request.getfixturevalue(f"stage1_{mode}")
    cfg = stage2_config(stage1)
    task = Stage2Task(cfg)
    assert cfg.model.hidden_size == 32 and cfg.model.num_layers == 2  # adopted from the tiny stage-1 run
    assert any("model.hidden_size: 64 -> 32" in n for n in task.notes)
    model = task.build_model(cfg)
    _, s1 = load_consolidated(stage1["save_dir"])
    s1_state = s1.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if "lora_A" in n or "lora_B" in n or ".router." in n or
        n.startswith("vision.mapping.")
    }  # fmt: skip
    assert any(".router." in n for n in trainable) and any("mvm" in n and "lora_B" in n for n in trainable)
    assert not any(n.startswith("retrieval.") for n, _ in model.named_parameters())
    loaded = 0
    for name, p in model.named_parameters():
        if "lora_B" in name or ".router." in name:
            assert torch.count_nonzero(p) == 0, name  # fresh adapters/router: the model starts as stage 1 mixed
        elif name in s1_state and not name.startswith("vision.vision_model"):
            assert torch.equal(p, s1_state[name]), name  # MVM, mapping and the (random-init) frozen base
            loaded += 1
    assert loaded > 0 and all(f"layers.{i}.mvm.down_proj.weight" in " ".join(s1_state) for i in range(2))
    # with uniform gates and zero LoRA B the stage-2 model computes h + (MLP(u) + MVM(u)) / 2
    with torch.no_grad(), model.forced_gates([0.0, 1.0]):
        ids = torch.randint(4, 1000, (2, 12))
        a = model(input_ids=ids).logits
        b = s1(input_ids=ids).logits  # stage 1 (replace placement): h + MVM(u)
    assert torch.allclose(a, b, atol=1e-5)


def _fake_checkpoint(root, *, stage="mvm", complete=True, config=None):
    path = root / "step_00000004"
    (path / "mks2").mkdir(parents=True)
    (path / "mks2" / "trainer.json").write_text(json.dumps({"run": {"stage": stage}}))
    (path / "mks2" / "config.json").write_text(json.dumps(config or {"model": {"stage": stage}}))
    if complete:
        (path / ckpt.MARKER).write_text("{}")
    return path


def test_locate_stage1_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        locate_stage1(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="model.init_from_stage1: .*no complete checkpoint"):
        locate_stage1(empty)
    partial = _fake_checkpoint(tmp_path / "partial", complete=False)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        locate_stage1(partial)
    base = _fake_checkpoint(tmp_path / "base", stage="mome")
    with pytest.raises(ckpt.CheckpointError, match="stage 'mome' run"):
        locate_stage1(base.parent)
    ok = _fake_checkpoint(tmp_path / "ok")
    assert locate_stage1(ok.parent).tag == "step_00000004" and locate_stage1(ok).tag == "step_00000004"


def test_adopt_stage1_config_takes_architecture_and_base(tmp_path):
    saved = load_config(None, ["model.hidden_size=32", "model.mvm.layers=[0, 2]", "model.init_from=/models/base"])
    from mks2.config import to_dict

    path = _fake_checkpoint(tmp_path / "s1", config=to_dict(saved))
    cfg = load_config(DEMO_STAGE2, ["model.init_from_stage1=x"])
    notes = adopt_stage1_config(cfg, locate_stage1(path.parent))
    assert cfg.model.hidden_size == 32 and list(cfg.model.mvm.layers) == [0, 2]
    assert cfg.model.init_from == "/models/base"  # the frozen base: the stage-1 run's init
    assert any("model.mvm.layers" in n for n in notes) and any("model.init_from" in n for n in notes)
    # a text-only stage 2 keeps vision off; a vision stage 2 from a text-only stage 1 is refused
    saved_text = to_dict(load_config(None, ["model.vision.kind=none", "model.stage=base"]))
    path2 = _fake_checkpoint(tmp_path / "s1b", config=saved_text)
    with pytest.raises(ckpt.CheckpointError, match="had no vision front-end"):
        adopt_stage1_config(load_config(DEMO_STAGE2), locate_stage1(path2.parent))


def test_which_tensors_come_from_stage1():
    assert wanted_from_stage1("model.layers.0.mvm.up_proj.weight", base_from_checkpoint=False)
    assert wanted_from_stage1("vision.mapping.weight", base_from_checkpoint=False)
    assert not wanted_from_stage1("model.layers.0.mlp.up_proj.weight", base_from_checkpoint=False)
    assert wanted_from_stage1("model.layers.0.mlp.up_proj.weight", base_from_checkpoint=True)
    for fresh in ("model.layers.0.mvm.up_proj.lora_B", "model.layers.0.router.weight", "vision.vision_model.x"):
        assert not wanted_from_stage1(fresh, base_from_checkpoint=True), fresh


# --------------------------------------------------------------------------------------------
# Data selection and presets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice, kept", [("all", 2), ("text", 1), ("multimodal", 1)])
def test_sft_data_selects_datasets_by_kind(choice, kept, demo_cache):
    cfg = resolve(
        load_config(DEMO_STAGE2, [f"data.cache_dir={demo_cache}", f"train.sft_data={choice}"]), progress=False
    )
    select_sft_datasets(cfg)
    paths = [s.path for s in cfg.data.datasets]
    assert len(paths) == kept
    if choice == "text":
        assert "text_sft" in paths[0]
    if choice == "multimodal":
        assert "mm_sft" in paths[0]


def test_sft_data_without_a_matching_dataset_is_a_config_error(demo_cache):
    cfg = load_config(DEMO_STAGE2, [f"data.cache_dir={demo_cache}", "train.sft_data=multimodal",
                                    "data.datasets=[demo:text_sft]"])  # fmt: skip
    with pytest.raises(ConfigError, match="none of data.datasets is with images"):
        select_sft_datasets(resolve(cfg, progress=False))


def test_ablation_presets():
    assert set(ABLATIONS) == {"mks2", "wo_mm_sft", "wo_text_sft", "wo_mome", "wo_mm_sft_mome", "inst_lora"}
    cfg = load_config(DEMO_STAGE2, ablation_overrides("inst_lora"))
    assert cfg.model.init_from_stage1 is None and cfg.model.mome.use_mvm is False
    assert cfg.train.sft_data.value == "text"
    with pytest.raises(ConfigError, match="INST-LoRA instruction-tunes the base model"):
        check_ablation("inst_lora", cfg)
    check_ablation("inst_lora", load_config(DEMO_STAGE2, [*ablation_overrides("inst_lora"), "model.init_from=/m"]))
    assert load_config(DEMO_STAGE2, ablation_overrides("wo_mome")).model.mome.use_mvm is False
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ablation_overrides("nope")


def test_stage2_check_messages():
    cfg = load_config(DEMO_STAGE2, ["model.init_from_stage1=null", "model.stage=base", "model.vision.kind=none"])
    problems = Stage2Task(cfg).check(cfg)
    assert any("trains stage 'mome'" in p for p in problems)
    assert any("model.vision.kind=none" in p for p in problems)


# --------------------------------------------------------------------------------------------
# One micro-batch: answer-only loss, and the mapping runs without images
# --------------------------------------------------------------------------------------------


def test_micro_batches_with_and_without_images(demo_cache):
    """A text-only micro-batch still runs the trainable mapping (zero images, zero gradient); a batch with
    images gives it a real gradient; the loss is the cross-entropy of the answer tokens only."""
    from mks2.data import build_dataloader
    from mks2.model import build_model
    from mks2.model.vision import load_image_processor, vision_prefix_length
    from mks2.training.frozen_vision import FrozenVision

    overrides = [f"data.cache_dir={demo_cache}", "model.init_from_stage1=null", "model.lora.dropout=0",
                 "model.hidden_size=32", "model.num_layers=2", "data.seq_len=96",
                 "train.micro_batch_size=2"]  # fmt: skip
    cfg = resolve(load_config(DEMO_STAGE2, overrides), progress=False)
    task = Stage2Task(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    vision = FrozenVision.build(cfg.model, torch.device("cpu"))
    objective = SFTObjective(model, task)
    kw = {"image_processor": load_image_processor(cfg.model), "num_prefix_tokens": vision_prefix_length(cfg.model)}

    def first_batch(kind: str) -> dict:
        sub = copy.deepcopy(cfg)
        sub.train.sft_data = SFTData(kind)
        select_sft_datasets(sub)
        return next(iter(build_dataloader(sub, rank=0, world_size=1, **kw)))

    text_only, mm_batch = first_batch("text"), first_batch("multimodal")
    assert "pixel_values" not in text_only and mm_batch["pixel_values"].shape[0] >= 2

    for batch, has_images in ((text_only, False), (mm_batch, True)):
        model.zero_grad(set_to_none=True)
        prepared = task.prepare(batch, vision, torch.device("cpu"))
        assert prepared["vision_features"].shape[0] == (batch["pixel_values"].shape[0] if has_images else 0)
        loss = objective(**prepared)
        # the answer-only loss, by hand: the model's logits, cross-entropy where the next label is set
        with torch.no_grad():
            logits = model(
                input_ids=prepared["input_ids"],
                position_ids=prepared["position_ids"],
                segment_ids=prepared["segment_ids"],
                vision_features=prepared["vision_features"],
            ).logits
            target = batch["labels"][:, 1:]
            same = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (batch["segment_ids"][:, 1:] > 0)
            target = target.masked_fill(~same, -100)
            manual = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
            )
        assert torch.allclose(loss, manual, atol=1e-6)
        assert (target != -100).sum() < (batch["segment_ids"] != 0).sum() / 2  # prompts carry no loss
        loss.backward()
        grad = model.vision.mapping.weight.grad
        assert grad is not None, "the mapping must run on every micro-batch (ZeRO-3)"
        assert (torch.count_nonzero(grad) > 0) == has_images
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0
                   for n, p in model.named_parameters() if "lora_B" in n)  # fmt: skip
    metrics, n = task.sink.drain(torch.device("cpu"))
    assert n == 2 and metrics[1].item() == mm_batch["pixel_values"].shape[0]  # images recorded
    assert vision_features(None, None, torch.device("cpu")) is None
