"""The paper's stage-2 ablations and baselines as named config presets (``--ablation NAME``).

Each preset is a list of ``key=value`` overrides applied to the run config BEFORE the user's own
overrides. They map the rows of the paper's NLP table (seeds: MKS2 vs INST-LoRA and the ablations):

| name | row | what changes |
|---|---|---|
| ``mks2`` | MKS2 | nothing: stage-1 checkpoint, MoME of MLP+LoRA and MVM+LoRA, text + multimodal SFT |
| ``wo_mm_sft`` | w/o Multimodal-SFT | ``train.sft_data=text`` |
| ``wo_text_sft`` | w/o text SFT | ``train.sft_data=multimodal`` |
| ``wo_mome`` | w/o MoMEs | ``model.mome.use_mvm=false``: MLP + LoRA only (the stage-1 MVM is not used) |
| ``wo_mm_sft_mome`` | w/o (Multimodal-SFT & MoMEs) | both of the above |
| ``inst_lora`` | Llama-INST-LoRA | no stage 1 (``model.init_from_stage1=null``), MLP + LoRA, text SFT only: the
  base model of ``model.init_from`` instruction-tuned with LoRA |
"""

from __future__ import annotations

from dataclasses import dataclass

from mks2.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Ablation:
    label: str  # the row name in result tables
    overrides: tuple[str, ...]
    description: str


ABLATIONS: dict[str, Ablation] = {
    "mks2": Ablation("MKS2", (), "stage-1 MVM + MoME, text + multimodal SFT"),
    "wo_mm_sft": Ablation("w/o multimodal SFT", ("train.sft_data=text",), "text-only instruction data"),
    "wo_text_sft": Ablation("w/o text SFT", ("train.sft_data=multimodal",), "multimodal instruction data only"),
    "wo_mome": Ablation("w/o MoMEs", ("model.mome.use_mvm=false",), "MLP + LoRA only, no MVM expert or router"),
    "wo_mm_sft_mome": Ablation(
        "w/o (MM-SFT & MoMEs)",
        ("train.sft_data=text", "model.mome.use_mvm=false"),
        "text-only data and no MVM expert",
    ),
    "inst_lora": Ablation(
        "INST-LoRA",
        ("model.init_from_stage1=null", "model.mome.use_mvm=false", "train.sft_data=text"),
        "the base model (model.init_from) + LoRA, text instruction data, no stage 1",
    ),
}


def ablation_overrides(name: str | None) -> tuple[str, ...]:
    """Overrides of preset ``name`` (None: none). Raises ConfigError listing the presets."""
    if name is None:
        return ()
    if name not in ABLATIONS:
        raise ConfigError([f"--ablation: unknown preset {name!r} (known: {', '.join(ABLATIONS)})"])
    return ABLATIONS[name].overrides


def check_ablation(name: str | None, cfg: RunConfig) -> None:
    """Preset-specific problems of a loaded config (ConfigError)."""
    if name == "inst_lora" and not cfg.model.init_from:
        raise ConfigError(
            [
                "--ablation inst_lora: model.init_from is unset; INST-LoRA instruction-tunes the base model that "
                "stage 1 started from (a random base would make a meaningless baseline). The demo stage 1 of "
                "configs/demo.yaml starts from a random base; tools/demo_experiment.py pretrains a demo base model"
            ]
        )
