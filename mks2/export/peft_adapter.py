"""Stage-2 LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Our adapters live on the layers themselves (``...q_proj.lora_A`` [r, in], ``...q_proj.lora_B``
[out, r], update ``(alpha / r) * B A x``), which is exactly PEFT's LoRA with the same r and alpha.
Each becomes ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; ``target_modules`` is a
regular expression matching exactly the adapted modules. The other stage-2 trainable tensors (MoME
routers, the vision mapping) are saved as ``modules_to_save`` (``base_model.model.<name>``).

Module paths of attention and MLP adapters are transformers' Llama paths, so a model whose adapters
sit only there (``model.mome.use_mvm=false``, no vision: the "w/o MoMEs" ablation) is a LoRA on the
base ``LlamaForCausalLM`` and PEFT applies it with identical results. Adapters on MVM experts and
routers belong to the MKS2 model built from the stage-1 checkpoint (``base_model_name_or_path`` then
names it): PEFT reads these files, but only that model has the modules they adapt.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mks2.checkpoint.tensors import TensorSource, TensorSpec
from mks2.config import Precision, RunConfig, Stage, VisionKind
from mks2.export.layout import ExportError
from mks2.export.safetensors_stream import ShardedSafetensorsWriter
from mks2.model.dtypes import torch_dtype

ADAPTER_PREFIX = "base_model.model."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def target_modules_regex(modules: list[str], num_layers: int) -> str:
    """A regex that PEFT full-matches against exactly ``modules`` (module paths in our model)."""
    by_suffix: dict[str, set[int]] = defaultdict(set)
    others = []
    for module in modules:
        m = _LAYER.match(module)
        if m:
            by_suffix[m.group(2)].add(int(m.group(1)))
        else:
            others.append(re.escape(module))
    parts = []
    for suffix, layers in sorted(by_suffix.items()):
        idx = r"\d+" if layers == set(range(num_layers)) else "(?:" + "|".join(str(i) for i in sorted(layers)) + ")"
        parts.append(rf"model\.layers\.{idx}\.{re.escape(suffix)}")
    return "(?:" + "|".join(parts + others) + ")"


def adapter_names(source: TensorSource) -> tuple[list[str], list[str]]:
    """(LoRA-adapted module paths, other trainable stage-2 tensors) of a stage-2 source."""
    modules = sorted({n.rsplit(".", 1)[0] for n in source.meta if n.endswith((".lora_A", ".lora_B"))})
    extras = [n for n in source.meta if ".router." in n or n.startswith("vision.mapping.")]
    return modules, extras


def write_peft_adapter(
    source: TensorSource, cfg: RunConfig, out: Path, *, dtype: Precision, progress: bool = True
) -> dict[str, Any]:
    """Write the adapters of a stage-2 (``mome``) source into ``out``. Returns the export manifest part."""
    m = cfg.model
    if Stage(m.stage) != Stage.MOME:
        raise ExportError(f"--adapter-only: a {m.stage.value}-stage model has no LoRA adapters (stage mome has)")
    modules, extras = adapter_names(source)
    if not modules:
        raise ExportError(f"{source.description}: no LoRA adapters found (model.lora.targets={list(m.lora.targets)})")
    tdtype = torch_dtype(dtype)
    specs, reads = [], []
    for module in modules:
        for part in ("lora_A", "lora_B"):
            specs.append(
                (f"{ADAPTER_PREFIX}{module}.{part}.weight", TensorSpec(source.meta[f"{module}.{part}"].shape, tdtype))
            )
            reads.append(f"{module}.{part}")
    for name in extras:
        specs.append((ADAPTER_PREFIX + name, TensorSpec(source.meta[name].shape, tdtype)))
        reads.append(name)
    writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes=2**62, prefix="adapter_model")
    bar = tqdm(list(zip(specs, reads)), desc="writing adapters", unit="tensor", disable=not progress)
    for (written, _), read in bar:
        writer.write(written, source.get(read).to(tdtype))
    files = writer.close()

    llama_only = not extras and not any(".mvm." in module for module in modules)
    llama_only = llama_only and VisionKind(m.vision.kind) == VisionKind.NONE
    base = m.init_from if llama_only else (m.init_from_stage1 or m.init_from)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base else None,
        "r": int(m.lora.rank),
        "lora_alpha": float(m.lora.alpha),
        "lora_dropout": float(m.lora.dropout),
        "target_modules": target_modules_regex(modules, m.num_layers),
        "modules_to_save": sorted({n.rsplit(".", 1)[0] for n in extras}) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {
        "files": [*files, "adapter_config.json"],
        "adapted_modules": len(modules),
        "modules_to_save": config["modules_to_save"],
        "applies_to": "LlamaForCausalLM (transformers)" if llama_only else "the MKS2 stage-1 model (MVM experts)",
    }
