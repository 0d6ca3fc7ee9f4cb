"""Models for evaluation: a training checkpoint (either parallel mode) or a Hugging Face export directory.

``load_for_eval(path)`` returns an :class:`EvalModel`: the model in eval mode, its tokenizer and chat
template, and a uniform ``logits(input_ids, attention_mask)``. What ``path`` is, is decided by its
content:

- a ``train.save_dir`` (its newest complete checkpoint, or ``tag``) or one ``step_XXXXXXXX`` directory:
  read through ``mks2.checkpoint.load_consolidated``; tokenizer and chat template from the run's config;
- a directory with ``config.json`` (``tools/convert_to_hf.py`` output or any HF causal LM): loaded with
  ``transformers.AutoModelForCausalLM`` (its bundled code only if trusted: ``mks2.eval.remote_code``);
  tokenizer from the directory unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mks2 import checkpoint as ckpt
from mks2.config import to_dict
from mks2.eval.remote_code import decide_remote_code


@dataclass
class EvalModel:
    """A model ready for scoring: ``kind`` is ``mks2`` (our model class) or ``hf`` (a transformers model)."""

    model: nn.Module
    tokenizer: Any  # mks2.data.tokenizer.Tokenizer
    chat_template: str | None  # llama2 / vicuna_v1, or None for plain text prompts
    kind: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config (training checkpoints)
    device: torch.device = torch.device("cpu")
    remote_code_note: str | None = None  # whose code runs, for HF directories that ship code

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_id", None)
        return int(pad) if pad is not None else 0

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """input_ids / attention_mask [B, S] (right padding) -> (logits [B, S, V] fp32, aux)."""
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        aux = getattr(out, "aux", None) or {}
        return out.logits.float(), aux

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids, attention_mask)[0]

    @property
    def has_router(self) -> bool:
        return self.kind == "mks2" and any(True for _ in self.model.routers())


def is_training_checkpoint(path: Path) -> bool:
    if ckpt.TAG_RE.match(path.name) and (path / ckpt.MARKER).is_file():
        return True
    complete, _ = ckpt.list_checkpoints(path)
    return bool(complete)


def load_training_checkpoint(save_dir: str | Path, tag: str | None = None) -> tuple[dict[str, Any], nn.Module]:
    """(resolved run config dict, model with every tensor of the checkpoint) of a complete checkpoint."""
    cfg, model = ckpt.load_consolidated(Path(save_dir).expanduser(), tag)
    return to_dict(cfg), model


def load_for_eval(
    path: str | Path,
    *,
    tag: str | None = None,
    tokenizer: str | None = None,
    chat_template: str | None = "auto",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> EvalModel:
    """Load ``path`` (see module docstring). ``chat_template``: ``auto`` (the run's, or llama2 for HF
    exports), a template name, or None for plain prompts. An HF directory's own Python code runs only
    with ``trust_remote_code`` or when it is this package's verified bundle (``mks2.eval.remote_code``)."""
    from mks2.data.tokenizer import load_tokenizer

    p = Path(path).expanduser()
    device = torch.device(device)
    note: str | None = None
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    if is_training_checkpoint(p):
        config, model = load_training_checkpoint(p, tag)
        tok_path = tokenizer or config.get("data", {}).get("tokenizer")
        if not tok_path:
            raise ValueError(f"{p}: the run config names no data.tokenizer; pass --tokenizer")
        template = config.get("data", {}).get("chat_template", "llama2") if chat_template == "auto" else chat_template
        kind = "mks2"
    elif (p / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        decision = decide_remote_code(p, trust_remote_code=trust_remote_code)  # before any of its code runs
        note = decision.note
        model = AutoModelForCausalLM.from_pretrained(str(p), trust_remote_code=decision.trust, dtype=torch.float32)
        tok_path = tokenizer or str(p)
        template = "llama2" if chat_template == "auto" else chat_template
        config = {}
        kind = "mks2" if hasattr(model, "routers") and hasattr(model, "force_gates") else "hf"
    else:
        raise ValueError(
            f"{p} is neither a training checkpoint (a train.save_dir or step_XXXXXXXX directory with a COMPLETE "
            "marker) nor a Hugging Face model directory (config.json)"
        )
    model.to(device).eval()
    return EvalModel(
        model=model,
        tokenizer=load_tokenizer(tok_path),
        chat_template=template,
        kind=kind,
        source=str(p),
        config=config,
        device=device,
        remote_code_note=note,
    )
