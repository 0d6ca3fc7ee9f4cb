"""The shipped Llama-2 run configs load, and describe the real Llama-2 architectures."""

from __future__ import annotations

import pytest
import torch

from mks2 import load_config
from mks2.config import bundled_config
from mks2.model import MKS2ForCausalLM
from mks2.model.decoder import mvm_layer_indices

# (hidden, intermediate, layers, heads, parameters of the HF checkpoint)
LLAMA2 = {"7b": (4096, 11008, 32, 32, 6_738_415_616), "13b": (5120, 13824, 40, 40, 13_015_864_320)}


@pytest.mark.parametrize("size", list(LLAMA2))
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_llama2_config_loads(size, stage):
    cfg = load_config(bundled_config(f"llama2_{size}_{stage}.yaml"))
    m = cfg.model
    hidden, inter, layers, heads, n_params = LLAMA2[size]
    assert (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers) == (32000, hidden, inter, layers)
    assert (m.num_heads, m.num_kv_heads, m.max_position_embeddings) == (heads, heads, 4096)
    assert m.stage.value == {"stage1": "mvm", "stage2": "mome"}[stage]
    assert m.vision.kind.value == "blip2" and m.init_from
    assert cfg.train.precision.value == "bf16" and cfg.parallel.mode.value == "zero3"
    assert mvm_layer_indices(m.mvm.layers, m.num_layers) == list(range(layers))

    # The architecture fields give exactly the HF checkpoint's parameter count (built on the meta device).
    text_only_overrides = ["model.stage=base", "model.vision.kind=none", "model.init_from=null"]
    text_only = load_config(bundled_config(f"llama2_{size}_{stage}.yaml"), text_only_overrides)
    with torch.device("meta"):
        model = MKS2ForCausalLM(text_only.model, init=False)
    assert sum(p.numel() for p in model.parameters()) == n_params
