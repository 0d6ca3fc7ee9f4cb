"""README.md model card of an exported directory: what the model is, where it came from, how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mks2.config import RunConfig, Stage, to_dict

_STAGES = {
    Stage.BASE: "base Llama (no MVM / MoME)",
    Stage.MVM: "stage 1: Modular Visual Memory trained by image captioning + text-to-image retrieval",
    Stage.MOME: "stage 2: soft Mixture of Multimodal Experts (MLP and MVM experts with LoRA, per-token router)",
}


def _usage(fmt: str, adapter: bool, vision: bool) -> str:
    if adapter:
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            'base = AutoModelForCausalLM.from_pretrained("BASE_MODEL_DIR")\n'
            'model = PeftModel.from_pretrained(base, "THIS_DIR")\n```\n'
        )
    remote = ", trust_remote_code=True" if fmt == "mks2" else ""
    text = (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("THIS_DIR"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR"{remote})\n'
        'messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
        'ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]\n'
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))\n```\n"
    )
    if fmt == "mks2":
        text += (
            "\nThe modeling code is the `mks2` package's own model code, bundled in this directory "
            "(`mks2_*.py`, each file names the package file and sha256 it was generated from). "
            "`generate()` uses a key/value cache (`DynamicCache`); the tokenizer carries the training chat "
            "template (`apply_chat_template`).\n"
        )
    if vision:
        text += (
            "\nImages: put `mks2.vision.image_token_id` (config.json) P times in `input_ids` where the image "
            "goes (P = the vision prefix length) and pass `pixel_values` [N, 3, H, W] (the vision tower's "
            "image processor config is in `vision/`).\n"
        )
    return text


def write_model_card(
    out: Path,
    cfg: RunConfig,
    *,
    export: dict[str, Any],
    verification: dict[str, Any] | None,
) -> None:
    """``export``: the mks2_export.json content (format, dtype, provenance, ...)."""
    m = cfg.model
    stage = Stage(m.stage)
    prov = export.get("provenance", {})
    adapter = export.get("format") == "peft-lora"
    lines = [
        "---",
        "library_name: " + ("peft" if adapter else "transformers"),
        "tags: [mks2, llama" + (", lora" if adapter else "") + "]",
        "---",
        "",
        f"# MKS2 export: {stage.value} stage",
        "",
        f"- **Stage**: `{stage.value}`, {_STAGES[stage]}",
        f"- **Base model**: `{prov.get('base_model') or 'none (trained from random initialisation)'}`",
    ]
    if prov.get("stage1_checkpoint"):
        lines.append(f"- **Stage-1 checkpoint**: `{prov['stage1_checkpoint']}`")
    if prov.get("checkpoint"):
        lines.append(
            f"- **Training checkpoint**: `{prov['checkpoint']}` (step {prov.get('step')}, "
            f"{prov.get('parallel_mode')} mode)"
        )
    lines += [
        f"- **Vision front-end**: `{m.vision.kind.value}`"
        + (f" from `{prov.get('vision_tower')}`" if prov.get("vision_tower") else ""),
        f"- **Format**: `{export.get('format')}`, weights in `{export.get('dtype')}`"
        + (", LoRA merged into the weights" if export.get("merge_lora") else ""),
        f"- **Tokenizer**: `{prov.get('tokenizer') or 'none recorded in the run config'}`",
        "- **Exported by**: mks2 " + str(export.get("mks2_version")) + " (`tools/convert_to_hf.py`)",
        "",
        "## Verification",
        "",
    ]
    if verification:
        lines += [
            "Logits of this export (loaded with transformers) against the `mks2` model rebuilt from the "
            f"checkpoint, on a fixed batch of {verification['positions']} token positions:",
            "",
            f"- exported weights computed in fp32: max |diff| = {verification['exact_max_abs_diff']:.3g} "
            f"(limit {verification['atol']:g})",
            f"- run in {verification['native_dtype']}: max |diff| = {verification['native_max_abs_diff']:.3g}, "
            f"top-1 agreement {verification['top1_agreement']:.1%}",
        ]
    else:
        lines.append("Not verified (`--no-verify`).")
    lines += [
        "",
        "## Usage",
        "",
        _usage(str(export.get("format")), adapter, m.vision.kind.value != "none"),
        "## License",
        "",
        "The weights derive from the base model above and inherit its license (e.g. the Llama 2 "
        "Community License for Llama-2 weights).",
        "",
        "## Training configuration",
        "",
        "The run config saved with the checkpoint (`mks2.config`):",
        "",
        "```json",
        json.dumps(to_dict(cfg), indent=2, sort_keys=True),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
