"""--adapter-only: stage-2 LoRA adapters in PEFT's format, loaded by peft itself."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftConfig, PeftModel
from peft.utils import load_peft_weights
from transformers import LlamaForCausalLM

from mks2.export import ExportError, export_model
from mks2.export.peft_adapter import ADAPTER_PREFIX, target_modules_regex
from tests.export.export_helpers import random_ids, run_config, tiny_model
from tests.fixtures import make_tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_tiny_llama(d)
    return d


@torch.no_grad()
def test_llama_lora_adapter_applies_in_peft_with_equal_logits(tmp_path, llama_dir):
    # MoME without MVM experts ("w/o MoMEs" ablation): exactly a LoRA on the base LlamaForCausalLM.
    targets = "model.lora.targets=[mlp,q_proj,k_proj,v_proj,o_proj]"
    cfg = run_config(
        "model.stage=mome", "model.mome.use_mvm=false", targets, "model.lora.alpha=12", llama_dir=llama_dir
    )
    model = tiny_model(cfg)
    # Adapters only: jitter_ moved the base weights too, so reload the base exactly as the HF checkpoint has it.
    from mks2.model.hf_loading import load_hf_llama

    load_hf_llama(model, llama_dir, progress=False)
    result = export_model(model, cfg, tmp_path / "adapter", adapter_only=True, progress=False)
    assert result.format == "peft-lora"
    out = tmp_path / "adapter"
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    config = PeftConfig.from_pretrained(str(out))
    assert config.r == 4 and config.lora_alpha == 12 and config.base_model_name_or_path == str(llama_dir)
    base = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ids = random_ids(2, 16, seed=2)
    plain = base(ids).logits  # before PEFT injects the adapters into ``base`` in place
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    adapted = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    theirs = peft_model(input_ids=ids).logits
    ours = model(ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_mome_adapter_files_hold_every_adapter_router_and_mapping(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5", llama_dir=llama_dir)
    model = tiny_model(cfg)
    export_model(model, cfg, tmp_path / "adapter", adapter_only=True, dtype="bf16", progress=False)
    out = tmp_path / "adapter"
    config = PeftConfig.from_pretrained(str(out))
    weights = load_peft_weights(str(out))
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n or ".router." in n}
    expected = {}
    for name, p in ours.items():
        if "lora_" in name:
            module, part = name.rsplit(".", 1)
            expected[f"{ADAPTER_PREFIX}{module}.{part}.weight"] = p
        else:
            expected[ADAPTER_PREFIX + name] = p
    assert set(weights) == set(expected)
    for key, value in weights.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, expected[key].detach().to(torch.bfloat16)), key
    assert config.modules_to_save == ["model.layers.0.router", "model.layers.1.router"]
    modules = {n.rsplit(".", 1)[0] for n in ours if "lora_" in n}
    assert {m for m in modules if re.fullmatch(config.target_modules, m)} == modules
    others = [n for n, _ in model.named_modules() if n and n not in modules]
    assert not [n for n in others if re.fullmatch(config.target_modules, n)]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card
    manifest = json.loads((out / "mks2_export.json").read_text())
    assert manifest["adapter"]["applies_to"].startswith("the MKS2 stage-1 model")


def test_target_regex_lists_only_the_adapted_layers():
    rx = target_modules_regex(
        ["model.layers.0.mlp.up_proj", "model.layers.2.mlp.up_proj", "model.layers.1.mvm.up_proj"], 3
    )
    assert re.fullmatch(rx, "model.layers.2.mlp.up_proj") and not re.fullmatch(rx, "model.layers.1.mlp.up_proj")
    assert re.fullmatch(rx, "model.layers.1.mvm.up_proj") and not re.fullmatch(rx, "model.layers.1.mvm.up_proj.x")


def test_adapter_only_needs_a_stage2_model(tmp_path, llama_dir):
    cfg = run_config("model.stage=base", llama_dir=llama_dir)
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_model(tiny_model(cfg), cfg, tmp_path / "adapter", adapter_only=True, progress=False)
    assert not (tmp_path / "adapter").exists()
