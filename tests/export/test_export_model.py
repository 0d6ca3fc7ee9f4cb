"""In-memory models exported with mks2.export.export_model load in transformers and give our logits."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mks2.export import ExportError, export_model
from tests.export.export_helpers import VOCAB, random_ids, run_config, tiny_model
from tests.fixtures import make_tiny_clip, make_tiny_llama
from tests.launching import python

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_tiny_llama(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    make_tiny_clip(d)
    return d


def _batch():
    ids = random_ids(2, 14, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def _keys(directory) -> dict[str, str]:
    """tensor name -> safetensors dtype code over every shard of an export."""
    out = {}
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as reader:
            for k in reader.keys():
                out[k] = reader.get_slice(k).get_dtype()
    return out


@torch.no_grad()
def test_mome_export_loads_with_remote_code_matches_logits_and_generates(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5", "model.lora.targets=[mlp,mvm,q_proj]",
                     llama_dir=llama_dir)  # fmt: skip
    model = tiny_model(cfg)
    result = export_model(model, cfg, tmp_path / "out", dtype="fp32", progress=False)
    assert result.format == "mks2" and result.verification.exact_max_abs_diff <= 1e-4

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(hf).__name__ == "MKS2LlamaForCausalLM" and hf.config.model_type == "mks2_llama"
    assert type(hf.core).__module__.endswith("mks2_model_modeling")  # the bundled code, not the package
    assert hf.core.model.layers[0].mlp.gate_proj.lora_A is not None  # adapters exported unmerged
    ids, mask = _batch()
    ours = model(ids, attention_mask=mask)
    theirs = hf(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(theirs.logits[real], ours.logits[real], atol=ATOL, rtol=0)
    gates = ours.aux["gates"][0]
    assert gates.std() > 1e-3  # the router matters, so a wrong router export would show

    # generate(): greedy, left-padded batch, equals a plain loop over our model
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq, m = ids, mask
    for _ in range(5):
        nxt = model(seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_stage1_export_with_vision_and_tied_embeddings(tmp_path, clip_dir):
    cfg = run_config("model.stage=mvm", "model.mvm.placement=parallel", "model.tie_word_embeddings=true",
                     vision_dir=clip_dir)  # fmt: skip
    model = tiny_model(cfg)
    export_model(model, cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "vision" / "config.json").is_file()
    assert "lm_head.weight" not in _keys(tmp_path / "out")  # tied: stored once, as the embedding
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    p = model.vision.num_prefix_tokens
    ids = random_ids(2, 10 + p, seed=5)
    ids[1, 2 : 2 + p] = cfg.model.vision.image_token_id
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = model(ids, pixel_values=pixels).logits
    theirs = hf(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # the retrieval head (stage 1) is exported too
    torch.testing.assert_close(hf.retrieval.proj.weight, model.retrieval.proj.weight, atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}])
def test_base_stage_exports_plain_llama(tmp_path, rope):
    d = tmp_path / "llama"
    make_tiny_llama(d, **({"rope_scaling": rope} if rope else {}))
    cfg = run_config("model.stage=base", llama_dir=d)
    model = tiny_model(cfg)
    result = export_model(model, cfg, tmp_path / "out", progress=False)
    assert result.format == "llama"
    out = tmp_path / "out"
    assert not list(out.glob("*.py"))  # no remote code
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    hf = LlamaForCausalLM.from_pretrained(out).eval()  # vanilla transformers, no trust_remote_code
    ids = random_ids(2, 20, seed=1)
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_merge_lora_folds_adapters(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5", "model.lora.targets=[mlp,mvm,v_proj]",
                     llama_dir=llama_dir)  # fmt: skip
    model = tiny_model(cfg)
    result = export_model(model, cfg, tmp_path / "out", merge_lora=True, progress=False)
    assert result.verification.exact_max_abs_diff <= 1e-4
    assert not [k for k in _keys(tmp_path / "out") if "lora" in k]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mks2"]["lora"]["targets"] == []
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = random_ids(2, 12)
    torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert model.model.layers[0].mlp.gate_proj.lora_A is not None  # the caller's model is untouched


def test_bf16_export_and_sharding(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5", llama_dir=llama_dir)
    model = tiny_model(cfg)
    result = export_model(model, cfg, tmp_path / "out", dtype="bf16", max_shard_size="20KB", progress=False)
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 20_000 + 2_000 for s in shards)  # + header
    keys = _keys(out)
    assert set(keys) == set(index["weight_map"]) and set(keys.values()) == {"BF16"}
    assert index["metadata"]["total_size"] == result.total_bytes
    # weights rounded to bf16 reproduce our rounded model exactly; bf16 compute is only reported
    assert result.verification.exact_max_abs_diff <= 1e-4
    assert 0 < result.verification.native_max_abs_diff < 0.5
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hf.model.layers[0].mvm.up_proj.weight.dtype == torch.bfloat16


def test_llama_format_refused_for_expert_models(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", llama_dir=llama_dir)
    with pytest.raises(ExportError, match="not a plain Llama"):
        export_model(tiny_model(cfg), cfg, tmp_path / "out", fmt="llama", progress=False)
    with pytest.raises(ExportError, match="no LoRA adapters"):
        cfg1 = run_config("model.stage=base", llama_dir=llama_dir)
        export_model(tiny_model(cfg1), cfg1, tmp_path / "out", merge_lora=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_exported_model_needs_neither_mks2_nor_omegaconf(tmp_path, llama_dir):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5", llama_dir=llama_dir)
    model = tiny_model(cfg)
    export_model(model, cfg, tmp_path / "out", verify=False, progress=False)
    ids = random_ids(1, 8)
    expected = model(ids).logits[0, -1, :4].tolist()
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("mks2", "mks2_kernels", "omegaconf"):
            sys.modules[name] = None  # any import of them now fails
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True)
        ids = torch.tensor({ids.tolist()})
        print(m(input_ids=ids).logits[0, -1, :4].tolist())
        """
    )
    run = python("-c", script, cwd=tmp_path)  # not the repository root, where the package is importable
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == pytest.approx(expected, abs=1e-5)
    assert VOCAB == model.vocab_size
