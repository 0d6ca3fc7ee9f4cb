"""Single-process unit tests of the training helpers: schedule, DeepSpeed config filling, fault hooks
(checkpoint discovery/retention/RNG state: tests/checkpoint)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mks2.config import ConfigError, load_config, to_dict
from mks2.training import faults
from mks2.training.ds_config import build_ds_config
from mks2.training.loop import resolved_config
from mks2.training.schedule import build_scheduler, lr_at
from tests.fixtures import make_tiny_llama


def test_schedule_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    lrs = [lr_at(s, **kw) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # flat after max_steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_scheduler_state_round_trip_is_exact():
    cfg = load_config(None, ["train.lr=0.5", "train.min_lr=0.05", "train.warmup_steps=3", "train.max_steps=20"])
    p = torch.nn.Parameter(torch.zeros(2))

    def make():
        opt = torch.optim.AdamW([p], lr=cfg.train.lr)
        return opt, build_scheduler(opt, cfg.train)

    opt, sched = make()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(0, lr=0.5, min_lr=0.05, warmup_steps=3, max_steps=20))
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_ds_config_values_come_from_the_run_config(tmp_path):
    template = tmp_path / "t.json"
    template.write_text(
        json.dumps(
            {
                "train_batch_size": 999,
                "gradient_accumulation_steps": 7,
                "optimizer": {"type": "Adam", "params": {"lr": 0.5}},
                "scheduler": {"type": "WarmupLR"},
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 123},
            }
        )
    )
    cfg = load_config(
        None,
        [f"parallel.ds_config={template}", "train.micro_batch_size=2", "train.global_batch_size=16",
         "train.lr=0.001", "train.precision=fp32", "train.grad_clip=0.5"],
    )  # fmt: skip
    ds, notes = build_ds_config(cfg, data_parallel_size=2, use_torch_adam=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4  # 16 / (2 x 2)
    assert ds["train_batch_size"] == 16
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.001
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 123
    text = "\n".join(notes)
    for key in ("train_batch_size", "gradient_accumulation_steps", "optimizer.params.lr", "scheduler",
                "bf16.enabled", "zero_optimization.stage"):  # fmt: skip
        assert key in text, (key, text)


def test_ds_config_pipeline_template_and_bad_json(tmp_path):
    cfg = load_config(
        None, ["parallel.mode=pipeline", "parallel.pipeline_stages=2", "train.activation_checkpointing=true"]
    )
    ds, _ = build_ds_config(cfg, data_parallel_size=1, use_torch_adam=False)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["pipeline"]["activation_checkpoint_interval"] == 1
    assert "torch_adam" not in ds["optimizer"]["params"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    cfg = load_config(None, [f"parallel.ds_config={bad}"])
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 2"):
        build_ds_config(cfg, data_parallel_size=1, use_torch_adam=True)


def test_poison_makes_every_upstream_gradient_nan():
    w = torch.nn.Parameter(torch.ones(3))
    good, bad = (w * 2).sum(), torch.log(torch.tensor(-1.0))  # bad: NaN without a path to w
    loss = faults.poison_nonfinite(good + bad)
    loss.backward()
    assert torch.isnan(w.grad).all()
    w.grad = None
    faults.poison_nonfinite((w * 2).sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_nan_injection_hook(monkeypatch):
    monkeypatch.setenv("MKS2_INJECT_NAN", "3:1,5:0")
    faults.set_context(step=3, rank=1)
    assert torch.isnan(faults.maybe_poison(torch.tensor(1.0)))
    faults.set_context(step=3, rank=0)
    assert faults.maybe_poison(torch.tensor(1.0)) == 1.0
    monkeypatch.setenv("MKS2_INJECT_NAN", "oops")
    with pytest.raises(ValueError, match="MKS2_INJECT_NAN: expected STEP:RANK"):
        faults.maybe_poison(torch.tensor(1.0))
    faults.set_context(step=0, rank=0)


def test_path_checks_name_every_missing_input(tmp_path):
    from mks2.training.task import check_paths

    cfg = load_config(
        None,
        [f"model.init_from={tmp_path / 'nope'}", f"model.vision.path={tmp_path / 'vis'}",
         f"data.datasets=[{tmp_path / 'd0'}]", f"data.eval_datasets=[{tmp_path / 'e0'}]"],
    )  # fmt: skip
    problems = check_paths(cfg)
    assert len(problems) == 4, problems
    assert any(p.startswith("model.init_from") and "does not exist" in p for p in problems)
    assert any(p.startswith("model.vision.path") for p in problems)
    assert any(p.startswith("data.datasets[0]: dataset directory not found") for p in problems)
    assert any(p.startswith("data.eval_datasets[0]") for p in problems)


def test_resolved_config_reads_init_from_without_changing_the_config(tmp_path):
    """Only rank 0 calls it (to check a resume): it must leave that rank's config as every other rank's."""
    make_tiny_llama(tmp_path / "llama", vocab_size=1024, intermediate_size=88)
    cfg = load_config(None, [f"model.init_from={tmp_path / 'llama'}"])
    before = to_dict(cfg)
    resolved = resolved_config(cfg)
    assert resolved["model"]["intermediate_size"] == 88 and resolved["model"]["hidden_size"] == 32
    assert to_dict(cfg) == before and before["model"]["intermediate_size"] == 176
