"""Read the checkpoints the trainer writes, in ONE process and without a DeepSpeed engine.

    from mks2.checkpoint import load_consolidated, open_consolidated

    cfg, model = load_consolidated("runs/demo_stage1")                  # newest complete checkpoint
    cfg, model = load_consolidated("runs/demo_stage1", "step_00000050")  # or a tag / step number

    with open_consolidated("runs/demo_stage1") as ckpt:                 # tensor by tensor (converter)
        for name in ckpt.meta:                                         # our parameter names
            tensor = ckpt.get(name)

``save_dir`` is the run's ``train.save_dir`` (or one ``step_XXXXXXXX`` directory in it). Only
checkpoints carrying the trainer's completion marker are read. The run config saved with the
checkpoint (``mks2/config.json``) rebuilds the model; the tensors come from

- ``zero3`` mode: DeepSpeed's ZeRO reader (``deepspeed.utils.zero_to_fp32``), see ``mks2.checkpoint.zero_reader``;
- ``pipeline`` mode: the layer files, mapped by layer index, see ``mks2.checkpoint.pipeline_reader``.

Both modes' checkpoints hold every parameter, frozen ones included (ZeRO-3 stores each rank's
fragment of the frozen weights in its model-state file, and rank 0 writes the frozen vision towers,
which run outside the engine, into ``mks2/vision_towers.safetensors``: ``mks2.checkpoint.towers``;
pipeline layer files hold whole layers), so nothing is read from ``model.init_from`` or the vision
directory's weights. The vision directory's
``config.json`` (``model.vision.path``) must still exist: it defines the towers' architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.find import find_checkpoint
from mks2.checkpoint.metadata import TrainingCheckpoint
from mks2.checkpoint.pipeline_reader import PipelineSource
from mks2.checkpoint.safe_load import check_checkpoint_files
from mks2.checkpoint.tensors import DEFAULT_REFRESH_BYTES, CombinedSource, TensorSource, TensorSpec, tensor_specs
from mks2.checkpoint.towers import open_towers
from mks2.checkpoint.zero_reader import ZeroSource
from mks2.config import ParallelMode, RunConfig
from mks2.errors import name_mismatch
from mks2.model.build import apply_trainable_split
from mks2.model.modeling import MKS2ForCausalLM

# Prefixes the training engine may put before our parameter names (the stage objective wraps the
# model as ``.model``; DeepSpeed engines as ``module.``).
ENGINE_PREFIXES = ("", "model.", "module.", "module.model.")


class ConsolidatedCheckpoint(TensorSource):
    """A checkpoint's tensors under our parameter names, checked against the model its config builds.

    ``meta``: name -> shape/dtype as stored (fp32 for ZeRO master weights, the training dtype for
    frozen or pipeline-saved ones), in read order. ``get(name)``: one full tensor.
    """

    def __init__(self, ckpt: TrainingCheckpoint, expected: dict[str, TensorSpec], *, tied: bool, refresh_bytes: int):
        self.checkpoint = ckpt
        self.config = ckpt.config
        if ckpt.mode == ParallelMode.PIPELINE:
            self.raw: TensorSource = PipelineSource(
                ckpt.path, num_layers=ckpt.config.model.num_layers, refresh_bytes=refresh_bytes
            )
        else:
            self.raw = ZeroSource(ckpt.path, refresh_bytes=refresh_bytes)
        engine_names = list(self.raw.meta)
        prefix = max(
            ENGINE_PREFIXES, key=lambda p: sum(n.startswith(p) and n[len(p) :] in expected for n in engine_names)
        )
        towers = open_towers(ckpt.path, prefix)  # zero3: the frozen towers, written from the replica
        if towers is not None:
            try:
                self.raw = CombinedSource(self.raw, towers)
            except ValueError as exc:
                self.raw.close()
                raise CheckpointError(f"{ckpt.path}: {exc}") from exc
        self.description = self.raw.description
        raw_names = list(self.raw.meta)
        self._raw_name = {n[len(prefix) :]: n for n in raw_names if n.startswith(prefix)}
        ours = set(self._raw_name)
        # A tied head may be stored under both names; the embedding owns it.
        ignorable = {"lm_head.weight"} if tied else set()
        missing = set(expected) - ours
        unexpected = {n for n in raw_names if not n.startswith(prefix) or n[len(prefix) :] not in expected}
        unexpected -= {prefix + n for n in ignorable}
        if missing or unexpected:
            lines = name_mismatch(
                missing,
                unexpected,
                missing_as="missing {n} tensor(s) the model needs",
                unexpected_as="{n} tensor(s) the model does not have",
            )
            raise CheckpointError(
                f"{ckpt.path} does not match the model its saved config builds "
                f"(stage {ckpt.config.model.stage.value}):\n{lines}"
            )
        bad = [
            f"{n}: checkpoint {self.raw.meta[self._raw_name[n]].shape}, model {expected[n].shape}"
            for n in expected
            if self.raw.meta[self._raw_name[n]].shape != expected[n].shape
        ]
        if bad:
            raise CheckpointError(
                f"{ckpt.path}: tensor shapes differ from the model's:\n  - " + "\n  - ".join(bad[:10])
            )
        order = [n[len(prefix) :] for n in raw_names if n.startswith(prefix) and n[len(prefix) :] in expected]
        self.meta = {n: self.raw.meta[self._raw_name[n]] for n in order}

    def get(self, name: str) -> torch.Tensor:
        return self.raw.get(self._raw_name[name])

    def close(self) -> None:
        self.raw.close()


def build_empty_model(cfg: RunConfig, *, device: str | torch.device | None = None) -> nn.Module:
    """The model of ``cfg.model`` without loading any weights (random init skipped where a checkpoint
    provides the tensors). ``device="meta"`` gives a shape-only model (no memory)."""
    with torch.device(device) if device is not None else torch.device("cpu"):
        return MKS2ForCausalLM(cfg.model, init=False, load_vision_weights=False)


def open_consolidated(
    save_dir: str | Path, tag: str | int | None = None, *, refresh_bytes: int | None = None
) -> ConsolidatedCheckpoint:
    """Open a complete checkpoint for tensor-by-tensor reading under our names (see module docstring)."""
    ckpt = find_checkpoint(save_dir, tag)
    check_checkpoint_files(ckpt.path)  # before any reader unpickles a file
    shape_model = build_empty_model(ckpt.config, device="meta")
    return ConsolidatedCheckpoint(
        ckpt,
        tensor_specs(shape_model),
        tied=bool(ckpt.config.model.tie_word_embeddings),
        refresh_bytes=refresh_bytes or DEFAULT_REFRESH_BYTES,
    )


@torch.no_grad()
def load_consolidated(
    save_dir: str | Path, tag: str | int | None = None, *, progress: bool = True
) -> tuple[RunConfig, nn.Module]:
    """Rebuild the trained ``MKS2ForCausalLM`` of a checkpoint in this process.

    Returns ``(config, model)``: the run config saved with the checkpoint and the model in eval mode,
    in ``model.dtype`` (tensors stored in another dtype are converted), with the stage's
    trainable/frozen split applied. Raises CheckpointError for a missing, incomplete or mismatching
    checkpoint.
    """
    with open_consolidated(save_dir, tag) as ckpt:
        cfg = ckpt.config
        model = build_empty_model(cfg)
        targets = dict(model.state_dict(keep_vars=True))
        for name in tqdm(list(ckpt.meta), desc=f"loading {ckpt.checkpoint.tag}", unit="tensor", disable=not progress):
            targets[name].data.copy_(ckpt.get(name))
    apply_trainable_split(model, cfg.model.stage)
    return cfg, model.eval()
