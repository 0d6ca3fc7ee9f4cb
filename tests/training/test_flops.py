"""The FLOPs count (mks2.training.flops) against hand counts on the tiny shape, the modules it counts
against the modules whose forward really runs, and the batch counts (BatchCounts) of both stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mks2.model import build_model
from mks2.model.mome import MoMERouter
from mks2.training.flops import FlopsModel, flops_model, matmul_modules
from mks2.training.loop import step_accounting
from mks2.training.task import BatchCounts, causal_pairs, segment_lengths
from tests.fixtures import make_tiny_clip
from tests.tiny import run_config

# The tiny shape (tests.tiny.TINY_MODEL + the tiny CLIP): hidden D = 32, MLP/MVM width I = 64, 4 query
# heads and 2 key/value heads of width 8, vocabulary 128, 2 layers; the CLIP features (width 32) map
# to D, the retrieval projection maps D to the CLIP width 32.
D, INTER, KV_WIDTH, VOCAB, LAYERS, FEAT, EMBED = 32, 64, 16, 128, 2, 32, 32
ATTN = D * D + D * KV_WIDTH + D * KV_WIDTH + D * D  # q, k, v, o weights: 3072
SWIGLU = 3 * D * INTER  # gate, up, down: 6144
PAIR_FWD = 4 * D  # QK^T and PV per (query, key) pair and layer: 2 * (4 heads * 8) each = 128


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    make_tiny_clip(path)
    return path


def _model(clip_dir, *overrides: str) -> nn.Module:
    model = build_model(run_config(*overrides, vision_dir=clip_dir))
    assert model.vision.mapping.weight.shape == (D, FEAT)  # the shapes the hand counts assume
    assert model.lm_head.weight.shape == (VOCAB, D) and len(model.model.layers) == LAYERS
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (KV_WIDTH, D)
    return model


def test_stage1_replace_against_a_hand_count(clip_dir):
    fm = flops_model(_model(clip_dir, "model.stage=mvm"), recompute=False)
    # The trainable image mapping feeds the [2B, S, D] tensor of both views, so every layer passes
    # gradients down (input grad 2N on every op). Per layer and real token:
    #   frozen attention q, k, v, o: forward 2N + input grad 2N             = 4 * 3072 = 12288
    #   MVM (replace: the frozen MLP does not run), trainable: 2N + 2N + 2N = 6 * 6144 = 36864
    assert fm.decoder_per_token == 2 * (12288 + 36864) == 98304
    # Attention pairs: forward 128, backward twice that (gradients flow), per layer: 2 * 384.
    assert fm.attention_per_pair == 2 * (128 + 256) == 768
    assert fm.lm_head_per_token == 4 * VOCAB * D == 16384  # frozen head: forward + input grad
    assert fm.mapping_per_token == 4 * FEAT * D == 4096  # trainable, its input (tower features) needs no grad
    assert fm.retrieval_per_token == 6 * D * EMBED == 6144  # trainable retrieval projection of the EOS state
    # The formula this replaces counted every LLM parameter at 4N + 2N_trainable per padded position,
    # frozen MLP included; the useful decoder count is well below it.
    llm = LAYERS * (ATTN + 2 * SWIGLU) + 2 * VOCAB * D + FEAT * D
    trainable = LAYERS * SWIGLU + FEAT * D
    assert 4 * llm + 2 * trainable > 1.5 * fm.decoder_per_token


def test_stage1_recompute_and_parallel_placement(clip_dir):
    fm = flops_model(_model(clip_dir, "model.stage=mvm", "train.activation_checkpointing=true"), recompute=True)
    # Recompute: every layer (the backward passes through all) runs its forward again: 2N per weight
    # (2 * 3072 + 2 * 6144 = 18432) and one more attention forward (128 per pair).
    assert fm.decoder_per_token == 98304 + 2 * 18432
    assert fm.attention_per_pair == 768 + 2 * 128
    assert fm.lm_head_per_token == 16384 and fm.recompute
    par = flops_model(_model(clip_dir, "model.stage=mvm", "model.mvm.placement=parallel"), recompute=False)
    # parallel: the frozen MLP runs beside the MVM: + 4 * 6144 per layer.
    assert par.decoder_per_token == 98304 + 2 * 4 * SWIGLU


def test_frozen_layers_below_every_trainable_op_run_forward_only(clip_dir):
    model = _model(clip_dir, "model.stage=mvm", "model.mvm.layers=[1]")
    model.vision.mapping.requires_grad_(False)  # nothing trainable feeds the input any more
    fm = flops_model(model, recompute=False)
    # layer 0 (no MVM: the frozen MLP runs), nothing below needs grad: forward only,
    #   2 * 3072 + 2 * 6144 = 18432, attention pairs 128;
    # layer 1: frozen attention forward only 2 * 3072 = 6144 (pairs 128, no backward); MVM gate and up
    #   trainable on an input without grad: 4N each; down gets its input's grad too: 6N
    #   -> 4 * 2048 + 4 * 2048 + 6 * 2048 = 28672.
    assert fm.decoder_per_token == 18432 + 6144 + 28672
    assert fm.attention_per_pair == 128 + 128
    assert fm.lm_head_per_token == 16384  # above the MVM: input grad flows
    assert fm.mapping_per_token == 2 * FEAT * D  # frozen mapping: forward only


def test_stage2_mome_against_a_hand_count(clip_dir):
    model = _model(clip_dir, "model.stage=mome", "model.lora.rank=4", "model.lora.targets=[mlp,mvm]")
    fm = flops_model(model, recompute=False)
    # Per projection of an expert (frozen base W of 2048, LoRA A and B of 4 x 32 + 64 x 4 = 384 together,
    # all with gradients flowing): base 4 * 2048 = 8192, A and B trainable 6 * 384 = 2304 -> 10496;
    # both experts (MLP + LoRA, MVM + LoRA) run on every token: 2 * 3 * 10496 = 62976; router W_r [2, 32]
    # trainable 6 * 64 = 384; frozen attention 12288.
    assert fm.decoder_per_token == 2 * (12288 + 62976 + 384) == 151296
    assert fm.attention_per_pair == 768
    assert fm.lm_head_per_token == 16384 and fm.mapping_per_token == 4096
    assert fm.retrieval_per_token == 0  # no retrieval head in stage 2


@pytest.mark.parametrize(
    "overrides",
    [("model.stage=mvm",), ("model.stage=mvm", "model.mvm.placement=parallel", "model.mvm.layers=[0]"),
     ("model.stage=mome", "model.lora.rank=4", "model.lora.targets=[mlp,mvm,q_proj]")],
)  # fmt: skip
def test_counted_modules_are_the_modules_that_run(clip_dir, overrides):
    """The walk mirrors the model's forward: the matmul modules it counts are exactly those whose forward
    runs in a training step (the stage-1 retrieval projection included)."""
    model = _model(clip_dir, *overrides)
    model.train()
    ran: set[str] = set()
    kinds = (nn.Linear, MoMERouter, type(model.lm_head))
    towers = [n for n, _ in model.vision.named_modules() if n and not n.startswith("mapping")]
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(name.startswith(f"vision.{t}") for t in towers):
            module.register_forward_hook(lambda m, i, o, name=name: ran.add(name))
    p = model.vision.num_prefix_tokens
    ids = torch.tensor([[1, *[model.image_token_id] * p, 5, 6, 2]])  # BOS, image prefix, caption, EOS
    out = model(input_ids=ids, vision_features=torch.randn(1, p, FEAT), labels=ids.clamp(min=0))
    if model.retrieval is not None:
        model.retrieval.encode_text(out.hidden_states, torch.tensor([ids.shape[1] - 1]))
    assert {name for name, _ in matmul_modules(model)} == ran


def test_segment_lengths_and_pairs():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 2, 2, 3, 0, 0]])
    assert segment_lengths(seg).tolist() == [3, 2, 6, 1, 2, 1]
    assert causal_pairs(segment_lengths(seg)) == 6 + 3 + 21 + 1 + 3 + 1


def test_stage1_and_stage2_batch_counts(clip_dir):
    from mks2.training.stage1 import Stage1Task
    from mks2.training.stage2 import Stage2Task

    cfg = run_config("model.stage=mvm", vision_dir=clip_dir)
    img = int(cfg.model.vision.image_token_id)
    # Two captions, prefix P = 2 here: caption rows [2, 8] (BOS, P, 3 tokens, EOS = 7 and BOS, P, EOS = 5),
    # retrieval rows [2, 7] (the same captions without the prefix: 5 and 3).
    batch = {
        "input_ids": torch.tensor([[1, img, img, 5, 6, 7, 2, 0], [1, img, img, 2, 0, 0, 0, 0]]),
        "segment_ids": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]]),
        "ret_input_ids": torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 2, 0, 0, 0, 0, 0]]),
        "ret_segment_ids": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]),
        "ret_eos_index": torch.tensor([4, 1]),
    }
    counts = Stage1Task(cfg).counts(batch)
    assert counts == BatchCounts(samples=2, tokens=7 + 4 + 5 + 2, positions=2 * 2 * 8, head_tokens=11,
                                 image_tokens=4, attention_pairs=28 + 10 + 15 + 3, retrieval_tokens=2)  # fmt: skip
    # Stage 2: a packed row of two samples and a row of one (with an image), both padded.
    s2 = {
        "input_ids": torch.tensor([[1, 5, 2, 1, 6, 7, 2, 0], [1, img, img, 5, 2, 0, 0, 0]]),
        "segment_ids": torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]]),
    }
    task2 = Stage2Task.__new__(Stage2Task)  # the counts need only the config (no stage-1 run to locate)
    task2.cfg = run_config("model.stage=mome", vision_dir=clip_dir)
    assert task2.counts(s2) == BatchCounts(samples=3, tokens=12, positions=16, head_tokens=12, image_tokens=2,
                                           attention_pairs=6 + 10 + 15)  # fmt: skip


def test_step_accounting_fields(monkeypatch):
    total = BatchCounts(samples=8, tokens=300, positions=400, head_tokens=200, image_tokens=64, attention_pairs=900,
                        retrieval_tokens=8)  # fmt: skip
    monkeypatch.delenv("MKS2_PEAK_TFLOPS", raising=False)
    out = step_accounting(total, 2.0, None, "fp32", 2)
    assert out == {"samples": 8, "tokens": 300, "positions": 400, "padding_fraction": 0.25, "tokens_per_s": 150.0,
                   "samples_per_s": 4.0}  # fmt: skip
    fm = FlopsModel(decoder_per_token=10.0, attention_per_pair=2.0, lm_head_per_token=3.0, mapping_per_token=5.0,
                    retrieval_per_token=7.0, recompute=False)  # fmt: skip
    flops = 10 * 300 + 2 * 900 + 3 * 200 + 5 * 64 + 7 * 8
    monkeypatch.setenv("MKS2_PEAK_TFLOPS", "1e-9")  # 1000 FLOP/s per device
    out = step_accounting(total, 2.0, fm, "fp32", 2)
    assert out["flops"] == flops and out["mfu"] == pytest.approx(flops / (2.0 * 1000 * 2))
