"""The demo config's evaluation sets follow its training data: your own ``data.datasets`` drop them."""

from __future__ import annotations

import logging

from mks2.config import load_config
from mks2.demo.resolve import drop_demo_eval_sets


def test_own_training_data_drops_the_demo_eval_sets(caplog):
    cfg = load_config(None, ["data.datasets=[{path: /my/data}]"])  # configs/demo.yaml + your data
    assert [s.path for s in cfg.data.eval_datasets] == ["demo:captions_heldout"]
    with caplog.at_level(logging.INFO, logger="mks2.demo"):
        out = drop_demo_eval_sets(cfg)
    assert out.data.eval_datasets == [] and [s.path for s in cfg.data.eval_datasets] == ["demo:captions_heldout"]
    assert "dropped the demo's demo:captions_heldout" in caplog.text


def test_demo_data_and_own_eval_sets_are_kept():
    demo = load_config(None, [])
    assert drop_demo_eval_sets(demo) is demo  # the demo's own data: its held-out set stays
    own = load_config(None, ["data.datasets=[{path: /my/data}]", "data.eval_datasets=[{path: /my/heldout}]"])
    assert drop_demo_eval_sets(own) is own
