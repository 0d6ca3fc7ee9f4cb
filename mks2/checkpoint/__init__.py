"""The one home of training checkpoints: layout, writer, readers of both parallel modes, find, errors.

Layout of ``train.save_dir`` (one directory per saved optimizer step)::

    <save_dir>/
      step_00000010/                 DeepSpeed's files (model / optimizer / scheduler state; in pipeline
                                     mode one layer_XX-model_states.pt per LayerSpec)
        mks2/trainer.json            step, stage, parallel mode, world/data-parallel/pipeline sizes,
                                     tokens seen, skipped-step counters (rank 0)           metadata
        mks2/config.json             the resolved run config (mks2.config.to_dict) (rank 0) metadata
        mks2/vision_towers.safetensors  zero3 mode: the frozen vision towers (rank 0)          towers
        mks2/rank_00000.pt ...       one per rank: python/numpy/torch(/accelerator) RNG states and the
                                     rank's data-loader state (tensors/containers only)   rank_state
        COMPLETE                     written LAST by rank 0 after every rank finished (a barrier) writer
      latest                         tag of the newest COMPLETE checkpoint (what DeepSpeed's
                                     readers use)                                             writer
      metrics.jsonl                  one JSON object per optimizer step (mks2.training.metrics)

A directory without ``COMPLETE`` is not a checkpoint: ``find`` never returns it and retention
(``prune``) deletes it once a newer complete one exists. DeepSpeed's own ``latest`` is not written
(``save_latest=False``); ours is only updated after the marker, so it never points at a partial save.

Modules (each one job; the package imports config and model, never training or export):

- ``errors``: ``CheckpointError`` (a ``mks2.errors.UserError``), ``PipelineLayoutError``;
- ``layout``: names (``MARKER``, ``CLIENT_DIR``, ``TAG_RE``, ``tag_for``, ``rank_file``),
  ``list_checkpoints``, the shape-changing config keys (``shape_changes``);
- ``metadata``: the one writer/reader of ``trainer.json`` + ``config.json``, ``TrainingCheckpoint``;
- ``find``: the one ``find`` (save_dir or checkpoint directory + tag -> a complete checkpoint), with
  ``find_resume`` (``train.resume``'s none/auto/require policy) and ``find_checkpoint`` (+ metadata);
- ``rank_state`` / ``writer``: what the trainer saves per rank, and rank 0's marker, ``latest``, retention;
- ``run_lock``: ``SaveDirLock``, one run per ``train.save_dir`` (clears incomplete checkpoints of dead runs);
- ``safe_load``: weights-only loading with DeepSpeed's allow-list (``safe_load``, ``safe_torch_load``,
  ``check_checkpoint_files``, the engine's ``install_safe_checkpoint_engine``);
- ``tensors``: ``TensorSpec`` (shape + dtype), the ``TensorSource`` interface, ``ModuleSource``;
- ``zero_reader`` / ``pipeline_reader``: tensor-by-tensor readers of DeepSpeed's files per mode;
- ``towers``: ``save_towers`` / ``open_towers``, the frozen vision towers of a zero3 checkpoint (they run
  outside the engine, so rank 0 writes them from its replica into ``mks2/vision_towers.safetensors``);
- ``consolidated``: ``open_consolidated`` / ``load_consolidated`` (either mode, under our names);
- ``optim_shards`` / ``reshard``: a ZeRO checkpoint's optimizer shards as whole tensors, and
  ``load_resharded`` (a resume on another data-parallel size, either mode).
"""

from mks2.checkpoint.consolidated import (
    ConsolidatedCheckpoint,
    build_empty_model,
    load_consolidated,
    open_consolidated,
)
from mks2.checkpoint.errors import CheckpointError, CheckpointWriteError, PipelineLayoutError
from mks2.checkpoint.find import find, find_checkpoint, find_resume
from mks2.checkpoint.layout import (
    CLIENT_DIR,
    MARKER,
    TAG_RE,
    CheckpointDir,
    list_checkpoints,
    rank_file,
    resume_changes,
    shape_changes,
    tag_for,
)
from mks2.checkpoint.metadata import TrainingCheckpoint, read_meta, write_meta
from mks2.checkpoint.optim_shards import OptimizerShards
from mks2.checkpoint.rank_state import load_rank_state, save_rank_state, seed_rng, set_rng_state
from mks2.checkpoint.reshard import load_resharded
from mks2.checkpoint.run_lock import SaveDirBusyError, SaveDirLock
from mks2.checkpoint.safe_load import (
    UnsafeCheckpointError,
    check_checkpoint_files,
    install_safe_checkpoint_engine,
    safe_load,
    safe_torch_load,
    write_failure,
)
from mks2.checkpoint.tensors import ModuleSource, TensorSource, TensorSpec, tensor_specs
from mks2.checkpoint.towers import TOWERS_FILE, open_towers, save_towers
from mks2.checkpoint.writer import mark_complete, prune

__all__ = [
    "CLIENT_DIR",
    "MARKER",
    "TAG_RE",
    "TOWERS_FILE",
    "CheckpointDir",
    "CheckpointError",
    "CheckpointWriteError",
    "ConsolidatedCheckpoint",
    "ModuleSource",
    "OptimizerShards",
    "PipelineLayoutError",
    "TensorSource",
    "TensorSpec",
    "SaveDirBusyError",
    "SaveDirLock",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "build_empty_model",
    "check_checkpoint_files",
    "find",
    "find_checkpoint",
    "find_resume",
    "install_safe_checkpoint_engine",
    "list_checkpoints",
    "load_consolidated",
    "load_rank_state",
    "load_resharded",
    "mark_complete",
    "open_consolidated",
    "open_towers",
    "prune",
    "rank_file",
    "safe_load",
    "safe_torch_load",
    "read_meta",
    "resume_changes",
    "save_rank_state",
    "save_towers",
    "seed_rng",
    "set_rng_state",
    "shape_changes",
    "tag_for",
    "write_failure",
    "tensor_specs",
    "write_meta",
]
