"""Packed stage-1 micro-batches give the padded layout's losses (in-process, fp32, the demo world): the same
captions as one global batch, through the ZeRO-3 objective and through the pipeline split's layers; and the
caption loss stays the global token mean when the step is split into several packed micro-batches."""

from __future__ import annotations

import pytest
import torch

from mks2.config import load_config
from mks2.demo import resolve
from mks2.training.stage1 import Stage1Task
from tests.tiny import TINY

CPU = torch.device("cpu")


def _setup(demo_cache, packing: bool, extra=()):
    from mks2.data import build_dataloader
    from mks2.model.vision import load_image_processor, vision_prefix_length
    from mks2.training.frozen_vision import FrozenVision

    overrides = [*TINY, f"data.cache_dir={demo_cache}", f"data.packing={str(packing).lower()}",
                 "train.micro_batch_size=8", "train.global_batch_size=8", *extra]  # fmt: skip
    cfg = resolve(load_config(None, overrides), progress=False)
    task = Stage1Task(cfg)
    kw = {"image_processor": load_image_processor(cfg.model), "num_prefix_tokens": vision_prefix_length(cfg.model)}
    gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
    loader = build_dataloader(cfg, rank=0, world_size=1, grad_accumulation_steps=gas, **kw)
    return cfg, task, loader, FrozenVision.build(cfg.model, CPU)


def _model(task):
    torch.manual_seed(0)
    return task.build_model(task.cfg)


def _zero3_step(task, vision, batches):
    """Loss and metrics of one step through the ZeRO-3 objective (what the engine wraps), and the gradient
    of the trainable parameters (the mean of the micro-batch losses, as DeepSpeed's accumulation)."""
    model = _model(task)
    objective = task.objective(model)
    total = 0.0
    for batch in batches:
        loss = objective(**task.prepare(batch, vision, CPU)) / len(batches)
        loss.backward()
        total += loss.item()
    metrics, n = task.sink.drain(CPU)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    return total, (metrics / n).tolist(), grads


def _pipeline_step(task, vision, batch):
    """The same micro-batch through the pipeline split's layers (embedding, decoder layers, head) and the
    last stage's loss callable, in one process."""
    model = _model(task)
    spec = task.pipeline(model)
    layers = [s.build() for s in spec.layers]
    inputs, labels = task.pipeline_tuples(task.prepare(batch, vision, CPU))
    # The last stage of several runs no tower (vision None): it has no inputs to give and the same labels;
    # the frozen image embedding reaches its head with the activations, as integer bits (no gradient).
    no_inputs, last_labels = task.pipeline_tuples(task.prepare(batch, None, CPU))
    assert no_inputs == () and len(last_labels) == len(labels)
    assert all(torch.equal(a, b) for a, b in zip(labels, last_labels))
    assert not inputs[-1].is_floating_point()
    for layer in layers:
        inputs = layer(inputs)
    loss = spec.loss_fn(inputs, labels)
    metrics, n = task.sink.drain(CPU)
    return loss.item(), (metrics / n).tolist()


@pytest.fixture(scope="module")
def layouts(demo_cache):
    """(task, first batch, frozen vision) of the padded and the packed layout: the same first 8 captions."""
    padded = _setup(demo_cache, False)
    packed = _setup(demo_cache, True, ["data.tokens_per_micro_batch=384"])  # 4 rows of 96 for 8 pairs
    return [(task, next(iter(loader)), vision) for _, task, loader, vision in (padded, packed)]


def test_packed_losses_equal_the_padded_layout(layouts):
    (t_pad, b_pad, vision), (t_pack, b_pack, _) = layouts
    assert b_pack["input_ids"].shape == (4, 96) and b_pack["ret_eos_flat"].numel() == 8
    assert t_pack.count_tokens(b_pack) == t_pad.count_tokens(b_pad)  # the same real tokens, both views
    assert t_pack.count_positions(b_pack) < t_pad.count_positions(b_pad) / 3
    loss_pad, m_pad, g_pad = _zero3_step(t_pad, vision, [b_pad])
    loss_pack, m_pack, g_pack = _zero3_step(t_pack, vision, [b_pack])
    assert loss_pack == pytest.approx(loss_pad, rel=1e-5)
    assert m_pack == pytest.approx(m_pad, rel=1e-5)  # caption loss, retrieval loss, accuracy, scale
    assert torch.allclose(g_pack, g_pad, rtol=1e-4, atol=1e-6)
    pipe_pad, pm_pad = _pipeline_step(t_pad, vision, b_pad)
    pipe_pack, pm_pack = _pipeline_step(t_pack, vision, b_pack)
    assert pipe_pad == pytest.approx(loss_pad, rel=1e-5)
    assert pipe_pack == pytest.approx(loss_pad, rel=1e-5) and pm_pack == pytest.approx(pm_pad, rel=1e-5)


def test_caption_loss_is_the_global_token_mean_over_packed_micro_batches(layouts, demo_cache):
    (t_pad, b_pad, vision), _ = layouts
    # The same 8 captions as 2 packed micro-batches of ~4 pairs (micro 4 x GAS 2): the step's caption loss
    # (the mean of the scaled micro-batch sums) is still the mean over the 8 captions' tokens.
    _, task, loader, _ = _setup(demo_cache, True, ["train.micro_batch_size=4", "data.tokens_per_micro_batch=192"])
    it = iter(loader)
    batches = [next(it), next(it)]
    assert sorted(int(b["step_pairs"]) for b in batches) == [8, 8]
    assert sum(b["ret_eos_flat"].numel() for b in batches) == 8
    _, m_split, _ = _zero3_step(task, vision, batches)
    _, m_pad, _ = _zero3_step(t_pad, vision, [b_pad])
    assert m_split[0] == pytest.approx(m_pad[0], rel=1e-5)


def test_a_budget_too_small_for_one_pair_is_a_config_error_naming_both_numbers(tmp_path):
    from mks2.config import ConfigError
    from mks2.model.vision import vision_prefix_length
    from mks2.training.stage1 import packing_problems
    from tests.fixtures import make_tiny_clip
    from tests.tiny import run_config

    make_tiny_clip(tmp_path / "clip")
    cfg = run_config("model.stage=mvm", "data.packing=true", "data.seq_len=8", "train.micro_batch_size=1",
                     vision_dir=tmp_path / "clip")  # fmt: skip
    p = vision_prefix_length(cfg.model)
    problems = packing_problems(cfg)
    assert len(problems) == 1 and "data.tokens_per_micro_batch=8" in problems[0] and f"needs {p + 6}" in problems[0]
    assert packing_problems(run_config("model.stage=mvm", "data.packing=true", "data.seq_len=64",
                                       vision_dir=tmp_path / "clip")) == []  # fmt: skip
    with pytest.raises(ConfigError, match="data.tokens_per_micro_batch=100: must be 0 or a positive multiple"):
        run_config("data.seq_len=64", "data.tokens_per_micro_batch=100")
