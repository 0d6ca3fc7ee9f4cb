"""Loading models for evaluation: an HF directory through transformers, and the demo base LM written by
``save_hf_llama`` (checked against transformers' LlamaForCausalLM and our loader)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from mks2 import build_model, load_config
from mks2.demo.base_lm import base_config, pretrain_demo_base, save_hf_llama
from mks2.eval import load_for_eval
from mks2.eval.data import prompt_ids

TINY = ["model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2"]  # fmt: skip


def test_save_hf_llama_matches_transformers_and_our_loader(tmp_path, demo_cache):
    cfg = base_config([f"data.cache_dir={demo_cache}", *TINY])
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    out = save_hf_llama(ours, cfg, tmp_path / "base")
    ids = torch.randint(3, cfg.model.vocab_size, (2, 11))
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    reloaded = build_model(load_config(None, ["model.stage=base", "model.vision.kind=none", f"model.init_from={out}"]))
    with torch.no_grad():
        ref = ours(input_ids=ids).logits
        assert torch.allclose(hf(input_ids=ids).logits, ref, atol=1e-5)
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, ref)

    # tools/evaluate.py's HF path: the same logits through load_for_eval, with the demo tokenizer
    em = load_for_eval(out, tokenizer=cfg.data.tokenizer, chat_template="llama2")
    assert em.kind == "hf" and em.chat_template == "llama2"
    p = torch.tensor([prompt_ids(em.tokenizer, "What colour is a zorp?", "llama2")])
    with torch.no_grad():
        assert torch.allclose(em.logits(p, torch.ones_like(p)), ours(input_ids=p).logits, atol=1e-5)


def test_demo_base_pretraining_lowers_the_loss(tmp_path, demo_cache):
    summary = pretrain_demo_base(
        tmp_path / "base", steps=12, batch_size=4, lr=3e-3, warmup_steps=2, progress=False,
        overrides=[f"data.cache_dir={demo_cache}", *TINY],
    )  # fmt: skip
    assert summary["loss_last"] < summary["loss_first"] - 0.5
    assert (tmp_path / "base" / "config.json").is_file() and (tmp_path / "base" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".base.*"))  # the temporary directory was renamed into place


def test_load_for_eval_rejects_other_directories(tmp_path):
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        load_for_eval(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_for_eval(tmp_path / "missing")
