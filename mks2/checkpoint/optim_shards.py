"""Read a ZeRO checkpoint's optimizer shards as whole tensors, whatever data-parallel size wrote them.

DeepSpeed writes one ``*zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt`` per data-parallel rank (per
pipeline stage ``mp`` in pipeline mode). Each holds that rank's slice of the fp32 master weights and of
every partitioned optimizer state (Adam's ``exp_avg`` / ``exp_avg_sq``), plus small per-group values
(``step``, the param-group hyper-parameters, the loss scaler). :class:`OptimizerShards` maps a trainable
parameter's name to the pieces of it in every rank's file and puts them back together:

- ZeRO-3 (``fp32_flat_groups``): each sub-group's flat buffer is the concatenation, in ``param_shapes``
  order, of every parameter's partition; a parameter of ``n`` elements has ``ceil(n / world)`` of them on
  every rank (the last one zero-padded) -- the arithmetic of DeepSpeed's ``zero_to_fp32``.
- ZeRO-1/2 and the bf16 optimizer (``single_partition_of_fp32_groups``): each group's flat buffer is split
  evenly over the ranks; ``param_slice_mappings`` (saved per rank) gives each parameter's start and length
  in that rank's slice, so the pieces in rank order are the parameter.

Files are loaded weights-only with the allow-list (``safe_load``) and memory-mapped, so a tensor costs
only the pages of it that are read. Only one parameter is assembled at a time (``full``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.safe_load import safe_load

_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
FP32 = "fp32"
"""The key :meth:`OptimizerShards.full` takes for the fp32 master weights themselves."""


def _model_states_file(ckpt_dir: Path, mp_rank: int) -> Path:
    """The model-state file with ``param_shapes``, the LR scheduler and the engine counters (rank 0's)."""
    for name in (f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt", f"mp_rank_{mp_rank:02d}_model_states.pt"):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise CheckpointError(f"{ckpt_dir}: no model-state file of model-parallel rank {mp_rank}")


class OptimizerShards:
    """The optimizer shards of checkpoint directory ``ckpt_dir`` for model-parallel (pipeline-stage) rank
    ``mp_rank``; ``world`` is the data-parallel size that wrote them."""

    def __init__(self, ckpt_dir: str | Path, mp_rank: int = 0):
        self.dir = Path(ckpt_dir)
        files: dict[int, Path] = {}
        for f in self.dir.iterdir():
            m = _OPTIM_FILE.match(f.name)
            if m and int(m.group(2)) == mp_rank:
                files[int(m.group(1))] = f
        self.world = len(files)
        if not files or sorted(files) != list(range(self.world)):
            raise CheckpointError(
                f"{self.dir}: optimizer files of data-parallel ranks {sorted(files)} for model-parallel rank "
                f"{mp_rank}; expected ranks 0..N-1 (the checkpoint is incomplete)"
            )
        self._sd = [safe_load(files[r], map_location="cpu", mmap=True)["optimizer_state_dict"] for r in sorted(files)]
        model_file = _model_states_file(self.dir, mp_rank)
        self.model_states: dict[str, Any] = safe_load(model_file, map_location="cpu", mmap=True)
        first = self._sd[0]
        self.zero3 = "fp32_flat_groups" in first
        counts = first.get("partition_count")
        counts = counts if isinstance(counts, list) else [counts]
        if any(c not in (None, self.world) for c in counts):
            raise CheckpointError(f"{self.dir}: written by {counts[0]} data-parallel ranks, {self.world} files found")
        # name -> (group, [(rank, start, numel), ...], numel of the parameter)
        self._where: dict[str, tuple[int, list[tuple[int, int, int]], int]] = {}
        if self.zero3:
            self._index_zero3()
        else:
            self._index_zero12()
        self.names = list(self._where)

    # ---- where each parameter lives -----------------------------------------------------------

    def _index_zero3(self) -> None:
        for g, shapes in enumerate(self.model_states["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                n = math.prod(shape)
                part = math.ceil(n / self.world)  # every rank holds ceil(n / world), the last one padded
                self._where[name] = (g, [(r, offset, part) for r in range(self.world)], n)
                offset += part

    def _index_zero12(self) -> None:
        for r, sd in enumerate(self._sd):
            for g, mapping in enumerate(sd["param_slice_mappings"]):
                for name, address in mapping.items():
                    group, pieces, n = self._where.setdefault(name, (g, [], 0))
                    pieces.append((r, int(address.start), int(address.numel)))
                    self._where[name] = (group, pieces, n + int(address.numel))

    # ---- reading ------------------------------------------------------------------------------

    def _base(self, rank: int) -> dict[str, Any]:
        sd = self._sd[rank]
        return sd["optimizer_state_dict"] if self.zero3 else sd["base_optimizer_state"]

    def _flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        if key == FP32:
            sd = self._sd[rank]
            return (sd["fp32_flat_groups"] if self.zero3 else sd["single_partition_of_fp32_groups"])[group]
        return self._base(rank)["state"][group][key]

    def group_of(self, name: str) -> int:
        return self._where[name][0]

    def numel(self, name: str) -> int:
        return self._where[name][2]

    def full(self, name: str, key: str = FP32) -> torch.Tensor:
        """Parameter ``name``'s whole ``key`` (``FP32`` or an optimizer-state key) as a flat fp32 tensor."""
        group, pieces, n = self._where[name]
        parts = [self._flat(r, group, key).narrow(0, start, numel) for r, start, numel in pieces]
        return torch.cat(parts)[:n].clone()  # clone: nothing keeps the memory-mapped files alive

    def partitioned_keys(self, group: int) -> list[str]:
        """Optimizer-state keys of ``group`` split over the ranks (1-d per-element tensors: exp_avg, ...)."""
        state = self._base(0)["state"].get(group, {})
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() >= 1]

    def scalar_state(self, group: int) -> dict[str, Any]:
        """Optimizer-state values of ``group`` that are the same on every rank (Adam's ``step``)."""
        state = self._base(0)["state"].get(group, {})
        return {k: v for k, v in state.items() if not (torch.is_tensor(v) and v.dim() >= 1)}

    def param_group(self, group: int) -> dict[str, Any]:
        """``group``'s hyper-parameters as saved (lr, betas, weight decay, ...; ``params`` left out)."""
        # The saved state is indexed by flat buffer; each saved param group lists the indices it holds
        # (ZeRO-3: one per sub-group, several sub-groups may share a group).
        for saved in self._base(0)["param_groups"]:
            if group in saved["params"]:
                return {k: v for k, v in saved.items() if k != "params"}
        raise CheckpointError(f"{self.dir}: no optimizer param group holds flat buffer {group}")

    def scaler_state(self) -> dict[str, Any]:
        """Loss-scaler values DeepSpeed keeps beside the base optimizer (fp16 runs; fixed 1.0 otherwise)."""
        keys = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")
        return {k: self._sd[0][k] for k in keys if k in self._sd[0]}
