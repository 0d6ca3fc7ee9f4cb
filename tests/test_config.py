"""Config loading: merged YAML + overrides, and one message listing every problem."""

import subprocess
import sys
from pathlib import Path

import pytest

from mks2.config import (
    ConfigError,
    MVMPlacement,
    ParallelMode,
    Precision,
    Stage,
    config_from_dict,
    load_config,
    schema,
    to_dict,
)
from mks2.config.reference import (
    REFERENCE_PATH,
    config_reference,
    enum_of,
    leaf_fields,
    undocumented_enum_values,
    undocumented_fields,
)
from mks2.errors import UserError
from mks2.model.decoder import mvm_layer_indices
from mks2.training.batch import check_world_size, grad_accumulation_steps


def test_demo_default_loads_and_overrides_apply():
    cfg = load_config(None, ["model.stage=mome", "train.lr=0.01", "model.mvm.layers=[0, 2]"])
    assert cfg.model.stage == Stage.MOME
    assert cfg.train.lr == pytest.approx(0.01)
    assert list(cfg.model.mvm.layers) == [0, 2]
    assert cfg.parallel.mode == ParallelMode.ZERO3


def test_every_problem_is_reported_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "model.hiden_size=3",  # typo
                "model.stage=foo",  # bad enum
                "train.lr=abc",  # wrong type
                "data.datasets=[{path: a, wieght: 2}]",  # typo inside a list entry
                "parallel.mode=pipeline",
                "parallel.zero_stage=3",  # impossible combination
            ],
        )
    err = info.value
    msg = str(err)
    assert len(err.problems) == 5, msg
    assert "model.hiden_size: unknown key" in msg and "did you mean 'model.hidden_size'" in msg
    assert "model.stage: invalid value 'foo' (allowed: base, mvm, mome)" in msg
    assert "train.lr: expected float, got 'abc'" in msg
    assert "data.datasets[0].wieght: unknown key" in msg and "did you mean 'weight'" in msg
    assert "parallel.zero_stage=3 cannot be used with parallel.mode=pipeline" in msg


def test_replace_placement_needs_matching_width():
    with pytest.raises(ConfigError, match="must equal model.intermediate_size"):
        load_config(None, ["model.mvm.placement=replace", "model.mvm.intermediate_size=100"])
    cfg = load_config(None, ["model.mvm.placement=parallel", "model.mvm.intermediate_size=100"])
    assert cfg.model.mvm.placement == MVMPlacement.PARALLEL


def test_yaml_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  stage: mvm\n  vision:\n    knd: clip\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "bad.yaml" in str(info.value) and "model.vision.knd: unknown key" in str(info.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(broken)


def test_malformed_override_and_section_assignment():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr", "model=3"])
    msg = str(info.value)
    assert "override 'train.lr': expected key=value" in msg
    assert "model" in msg


def test_mvm_layer_selection():
    assert mvm_layer_indices("all", 4) == [0, 1, 2, 3]
    assert mvm_layer_indices("every:2", 5) == [0, 2, 4]
    assert mvm_layer_indices([3, 1], 4) == [1, 3]
    for bad in ("every:0", "some", [7], [1, 1]):
        with pytest.raises(ValueError):
            mvm_layer_indices(bad, 4)


def test_batch_arithmetic_against_world_size():
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    assert check_world_size(cfg, 2) == []
    assert grad_accumulation_steps(cfg, 2) == 2
    assert "multiple of micro_batch_size x data-parallel size" in check_world_size(cfg, 3)[0]
    pipe = load_config(None, ["parallel.mode=pipeline", "parallel.pipeline_stages=2"])
    assert "not divisible by parallel.pipeline_stages" in check_world_size(pipe, 3)[0]
    with pytest.raises(ConfigError, match="needs parallel.mode=pipeline"):
        load_config(None, ["parallel.pipeline_stages=2"])


def test_round_trip_through_plain_dict():
    cfg = load_config(None, ["model.rope_scaling={rope_type: linear, factor: 2.0}", "model.stage=mome"])
    plain = to_dict(cfg)
    assert plain["model"]["stage"] == "mome"
    again = config_from_dict(plain)
    assert to_dict(again) == plain


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


def test_every_leaf_field_and_enum_value_is_documented():
    assert undocumented_fields() == [], "add a docstring right under each of these fields in mks2/config/schema.py"
    keys = {leaf.key for leaf in leaf_fields()}
    assert {"train.lr", "train.precision", "parallel.mode", "parallel.nvme_path", "data.chat_template"} <= keys
    assert "data.datasets[].weight" in keys and "model.mvm.layers" in keys
    assert undocumented_enum_values() == [], "add a docstring right under each of these enum members"
    assert any(enum_of(leaf.type) is Precision for leaf in leaf_fields())


def test_committed_config_reference_is_up_to_date():
    committed = Path(__file__).resolve().parents[1] / REFERENCE_PATH
    assert committed.read_text(encoding="utf-8") == config_reference(), (
        "docs/CONFIG.md is stale: python -m mks2.config --reference --output docs/CONFIG.md"
    )


def test_schema_needs_no_omegaconf():
    """The model and the bundled remote code import the schema alone: it must work without OmegaConf."""
    code = (  # schema.py loaded as a lone file (as in an export), with omegaconf made unimportable
        "import importlib.util, sys; sys.modules['omegaconf'] = None\n"
        f"spec = importlib.util.spec_from_file_location('schema_alone', {str(schema.__file__)!r})\n"
        "s = sys.modules['schema_alone'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(s)\n"
        "ours = sorted(m for m in sys.modules if m.startswith(('mks2', 'omegaconf', 'schema')))\n"
        "print(s.validate(s.RunConfig()), ours)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['omegaconf', 'schema_alone']"  # nothing but the file itself was imported
