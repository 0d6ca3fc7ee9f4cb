"""The small files of an exported directory: config.json, generation_config.json, the vision tower's
config, the tokenizer files.

Tokenizer (from the run's ``data.tokenizer``): a sentencepiece model becomes ``tokenizer.model`` plus
a ``tokenizer_config.json`` naming ``LlamaTokenizer`` (``transformers.LlamaTokenizer(vocab_file=...)``
alone gives a broken 3-token tokenizer in transformers 5, DESIGN §5; ``AutoTokenizer`` on this
directory loads it correctly). An HF tokenizer directory is copied. Either way ``tokenizer_config.json``
carries the run's chat template (``data.chat_template`` as Jinja, ``mks2.export.chat_template``) and
the model's real ``model_max_length`` (``model.max_position_embeddings``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mks2.config import RunConfig, VisionKind, to_dict
from mks2.data.tokenizer import HF_TOKENIZER_FILES
from mks2.export.bundle import ENTRY_MODULES
from mks2.export.chat_template import jinja_chat_template
from mks2.model.decoder import torch_dtype

VISION_SUBFOLDER = "vision"
# Files of the vision checkpoint that describe it (its weights are in the exported shards).
VISION_FILES = ("config.json", "preprocessor_config.json")
MKS2_ARCHITECTURE = "MKS2LlamaForCausalLM"


def _dtype_name(cfg: RunConfig) -> str:
    return str(torch_dtype(cfg.model.dtype)).removeprefix("torch.")


def exported_model_dict(cfg: RunConfig) -> dict[str, Any]:
    """The ``mks2`` entry of config.json: the model section without machine-local paths."""
    m = to_dict(cfg)["model"]
    m["init_from"] = None  # provenance goes to the model card, not into the architecture
    m["init_from_stage1"] = None
    m["vision"]["path"] = None  # the model directory's vision/ subfolder at load time
    return m


def llama_config_json(cfg: RunConfig, special: dict[str, int | None]) -> str:
    """config.json of a plain ``LlamaForCausalLM`` export."""
    from transformers import LlamaConfig

    m = cfg.model
    rope = {"rope_type": "default", **(dict(m.rope_scaling) if m.rope_scaling else {}), "rope_theta": m.rope_theta}
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.hidden_size // m.num_heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=bool(m.tie_word_embeddings),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
        dtype=_dtype_name(cfg),
        **special,
    )
    return config.to_json_string(use_diff=False)


def mks2_config_json(cfg: RunConfig, special: dict[str, int | None]) -> str:
    """config.json of an ``mks2_llama`` export (remote code)."""
    from mks2.export.remote.configuration_mks2 import MKS2LlamaConfig

    has_vision = VisionKind(cfg.model.vision.kind) != VisionKind.NONE
    names = {module.rsplit(".", 1)[1]: stem for module, stem in ENTRY_MODULES.items()}
    config = MKS2LlamaConfig(
        mks2=exported_model_dict(cfg),
        vision_subfolder=VISION_SUBFOLDER if has_vision else None,
        architectures=[MKS2_ARCHITECTURE],
        auto_map={
            "AutoConfig": f"{names['configuration_mks2']}.MKS2LlamaConfig",
            "AutoModelForCausalLM": f"{names['modeling_mks2']}.{MKS2_ARCHITECTURE}",
        },
        dtype=_dtype_name(cfg),
        **special,
    )
    return config.to_json_string(use_diff=True)


def generation_config_json(special: dict[str, int | None], *, use_cache: bool) -> str:
    from transformers import GenerationConfig

    return GenerationConfig(**special, use_cache=use_cache).to_json_string(use_diff=True)


def copy_vision_files(cfg: RunConfig, out: Path) -> list[str]:
    """Copy the vision checkpoint's config (and image processor config) into ``out/vision``."""
    if VisionKind(cfg.model.vision.kind) == VisionKind.NONE:
        return []
    src = Path(str(cfg.model.vision.path)).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"model.vision.path: {src} has no config.json; the export needs the vision tower's config "
            "(its weights come from the checkpoint)"
        )
    (out / VISION_SUBFOLDER).mkdir(exist_ok=True)
    copied = []
    for name in VISION_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / VISION_SUBFOLDER / name)
            copied.append(f"{VISION_SUBFOLDER}/{name}")
    return copied


def _sentencepiece_config(model_file: Path, max_length: int) -> tuple[dict[str, Any], dict[str, str]]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    if piece(sp.pad_id()):
        special["pad_token"] = piece(sp.pad_id())
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    return config, special


def write_tokenizer(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Write the run's tokenizer into ``out``. Returns {"files": [...], "special": {bos/eos/pad ids}}
    (empty when the run has no ``data.tokenizer``)."""
    from mks2.data.tokenizer import load_tokenizer

    path = cfg.data.tokenizer
    if not path:
        return {"files": [], "special": {}}
    if str(path).startswith("demo"):
        raise ValueError(f"data.tokenizer={path!r} is a demo placeholder: resolve the config first (mks2.demo.resolve)")
    src = Path(str(path)).expanduser()
    try:
        tok = load_tokenizer(src)
    except Exception as exc:  # DataError naming the problem; say which setting it came from
        raise ValueError(f"data.tokenizer: cannot export the run's tokenizer: {exc}") from exc
    files: list[str] = []
    chat_template = jinja_chat_template(cfg.data.chat_template)
    if src.is_dir() and (src / "tokenizer_config.json").is_file():
        for name in (*HF_TOKENIZER_FILES, "tokenizer.model"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                files.append(name)
        # The model was trained with our template and context length, whatever the source tokenizer says.
        config = json.loads((out / "tokenizer_config.json").read_text())
        config.update(chat_template=chat_template, model_max_length=cfg.model.max_position_embeddings)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if (out / "chat_template.jinja").exists():  # would take precedence over tokenizer_config.json's
            (out / "chat_template.jinja").unlink()
            files.remove("chat_template.jinja")
    else:
        model_file = src if src.is_file() else src / "tokenizer.model"
        shutil.copyfile(model_file, out / "tokenizer.model")
        config, special = _sentencepiece_config(model_file, cfg.model.max_position_embeddings)
        config["chat_template"] = chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
        files += ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    special_ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {"files": files, "special": special_ids, "vocab_size": tok.vocab_size}
