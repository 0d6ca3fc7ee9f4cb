"""Export MKS2 models to Hugging Face format (``tools/convert_to_hf.py`` is the command line).

    from mks2.export import convert_checkpoint, export_model

- ``convert_checkpoint(save_dir, out, tag=None, dtype=None, fmt="auto", merge_lora=False,
  adapter_only=False, max_shard_size="5GB", force=False, verify=True)``: a training checkpoint
  (ZeRO-3 or pipeline, any stage) -> HF directory, streamed tensor by tensor and verified.
- ``export_model(model, cfg, out, ...)``: the same for an in-memory ``MKS2ForCausalLM``.

Formats (``mks2.export.layout``): a plain ``LlamaForCausalLM`` directory for a base model without
vision, else our ``mks2_llama`` model type whose modeling code is generated from this package
(``mks2.export.bundle``) and loads with ``trust_remote_code=True``; or PEFT LoRA adapters
(``adapter_only``).
"""

from mks2.export.atomic import OutputExistsError
from mks2.export.convert import ExportResult, convert_checkpoint, export_model
from mks2.export.layout import ExportError, ExportFormat
from mks2.export.verify import VerificationError

__all__ = [
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "OutputExistsError",
    "VerificationError",
    "convert_checkpoint",
    "export_model",
]
