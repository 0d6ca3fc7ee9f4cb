"""A typo in a DeepSpeed template is a config error naming the key and the closest known key; the
shipped templates pass."""

from __future__ import annotations

import json

import pytest

from mks2.config import ConfigError, ds_template
from mks2.training.ds_config import load_template


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero2.json", "pipeline.json"])
def test_shipped_templates_are_accepted(name):
    assert "zero_optimization" in load_template(ds_template(name))


def test_top_level_typo_names_the_closest_key(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimizaton": {"stage": 3}, "_comment": "comments are fine"}))
    with pytest.raises(ConfigError) as info:
        load_template(path)
    message = str(info.value)
    assert "unknown key 'zero_optimizaton'; did you mean 'zero_optimization'?" in message
    assert str(path) in message and "_comment" not in message


def test_zero_section_typo_names_the_closest_key(tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_com": True, "reduce_bucket_size": 1}}))
    with pytest.raises(ConfigError, match="unknown zero_optimization key 'overlap_com'; did you mean 'overlap_comm'"):
        load_template(path)
