"""MKS2 model: Llama layers with Modular Visual Memory experts and soft MoME routing (DESIGN §1).

Public API::

    from mks2.model import build_model, MKS2ForCausalLM, MKS2Output, merge_lora, load_hf_llama, parameter_summary

See ``mks2.model.modeling`` for the module tree and ``mks2.model.pipeline_layout`` for the pipeline
split (layer list, key map, stage split) that training and the checkpoint reader share.
"""

from mks2.model.build import apply_trainable_split, build_model, init_mvm_from_mlp, is_trainable
from mks2.model.hf_loading import HFCheckpointError, apply_config_from_hf, load_hf_llama
from mks2.model.lora import merge_lora
from mks2.model.modeling import MKS2ForCausalLM, MKS2Output, causal_lm_loss, embed_inputs, prepare_positions
from mks2.model.summary import parameter_summary

__all__ = [
    "HFCheckpointError",
    "MKS2ForCausalLM",
    "MKS2Output",
    "apply_config_from_hf",
    "apply_trainable_split",
    "build_model",
    "causal_lm_loss",
    "embed_inputs",
    "init_mvm_from_mlp",
    "is_trainable",
    "load_hf_llama",
    "merge_lora",
    "parameter_summary",
    "prepare_positions",
]
