"""Process-group start-up for every launcher, and the collectives the training losses need.

``init_distributed`` works under ``deepspeed``, ``torchrun`` (env vars already set), ``mpirun``
(mpi4py discovery inside DeepSpeed) and Slurm's ``srun`` (SLURM_* variables mapped to the torch
ones), and for a plain ``python script.py`` (a world of one: no MPI discovery, a free port). A busy
default port (29500) is replaced by a free one for a plain run and under mpirun. On a machine without
a GPU DeepSpeed selects its CPU accelerator and we use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist

# Variables that show the process was started by an MPI launcher (Open MPI, MPICH/Intel MPI/PMI).
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_TORCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # scontrol missing: a single-node allocation is the only case we can still resolve safely.
        return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def map_slurm_env() -> bool:
    """Under ``srun`` without an MPI launcher, derive RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the
    SLURM_* variables so no mpi4py is needed. Returns True when it set them."""
    if all(v in os.environ for v in _TORCH_ENV) or any(v in os.environ for v in _MPI_RANK_VARS):
        return False
    if "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return False
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    # A per-job port keeps two jobs sharing a node apart.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


DEFAULT_PORT = 29500


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port(preferred: int = DEFAULT_PORT) -> int:
    """``preferred`` if nothing listens on it here, else a port the OS hands out as free."""
    if _port_is_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def launcher_kind() -> str:
    """``torch`` (torch env vars set: deepspeed/torchrun, or srun once mapped), ``mpi`` or ``none``."""
    if all(v in os.environ for v in ("RANK", "WORLD_SIZE")):
        return "torch"
    if any(v in os.environ for v in _MPI_RANK_VARS):
        return "mpi"
    return "none"


def set_single_process_env() -> None:
    """A plain ``python script.py``: a world of one on this host, no MPI discovery (DeepSpeed's would
    need an MPI library), on a free port (``MASTER_PORT`` if set and free)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port(int(os.environ.get("MASTER_PORT", DEFAULT_PORT))))


def mpi_port() -> int:
    """Under mpirun without ``MASTER_PORT``: rank 0 picks the default port if it is free on its host,
    else a free one, and tells every rank (DeepSpeed's discovery would use 29500 regardless)."""
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"])
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return int(comm.bcast(_free_port() if comm.Get_rank() == 0 else None, root=0))


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op (about 100 s) when its CPU backend starts.
    That op serves only ``inference_all_reduce``; training collectives go through gloo. Skip the build
    unless ``MKS2_CPU_SHM_COMM=1`` asks for it."""
    if os.environ.get("MKS2_CPU_SHM_COMM") == "1":
        return
    import importlib

    # importlib, not ``import deepspeed.comm.torch as m``: the package attribute ``torch`` there is torch itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Start torch.distributed through DeepSpeed for whichever launcher started us (idempotent)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_available() and dist.is_initialized():
        return
    accelerator = get_accelerator()
    backend = accelerator.communication_backend_name()
    if accelerator.device_name() == "cpu":
        backend = "gloo"
        _skip_cpu_shm_build()
    map_slurm_env()
    kind = launcher_kind()
    if kind == "none":
        set_single_process_env()
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=kind == "mpi",
        distributed_port=mpi_port() if kind == "mpi" else DEFAULT_PORT,
        timeout=timedelta(minutes=timeout_minutes),
        verbose=False,
    )
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def host_group(timeout_minutes: float = 24 * 60.0):
    """A gloo group of all ranks for waits that may outlast the accelerator backend's timeout (one rank per
    node hashing the data while the others wait): CPU objects only, its own long timeout. Every rank must
    call it (collective); None in a world of one."""
    if not _active():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))


def destroy_group(group) -> None:
    """Release a group made by :func:`host_group` (every rank)."""
    dist.destroy_process_group(group)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --------------------------------------------------------------------------------------------
# Collectives: the ONE place the package calls torch.distributed's communication functions
# --------------------------------------------------------------------------------------------
#
# NCCL accepts only tensors on the rank's own accelerator; gloo accepts CPU tensors, so a CPU test cannot
# see a collective on the wrong device. Every collective below first places its tensors on
# :func:`collective_device` (the accelerator's current device: ``cuda:<local rank>`` under NCCL, ``cpu``
# under gloo) and copies results back to where the caller's tensor lives. Object collectives pass that
# device explicitly (torch pickles into a tensor on it). ``tests/training/test_collectives.py`` checks
# both that no module outside this one calls a ``torch.distributed`` collective and that every tensor
# reaching one is on the collective device.

ReduceOp = dist.ReduceOp


def collective_device() -> torch.device:
    """The device every collective's tensors are placed on (the accelerator's current device)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _active(group=None) -> bool:
    """A collective is needed: the process group exists and ``group`` has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _placed(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the collective device, contiguous (a copy when it lives elsewhere)."""
    device = collective_device()
    return (t if t.device == device else t.to(device)).contiguous()


def _copy_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write a collective's result ``src`` into the caller's tensor ``dst`` when they differ."""
    if src is not dst:
        dst.copy_(src)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A collective's result moved back to the caller's device."""
    return t.to(device)


def barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(group) == "nccl":  # the device of the barrier's own tensor, explicitly
            dist.barrier(group=group, device_ids=[collective_device().index or 0])
        else:
            dist.barrier(group=group)


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Global rank ``src``'s values of ``t`` on every rank of ``group`` (in place; returns ``t``)."""
    if _active(group):
        placed = _placed(t)
        dist.broadcast(placed, src=src, group=group)
        _copy_back(t, placed)
    return t


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``t`` reduced with ``op`` over ``group`` (in place; returns ``t``)."""
    if _active(group):
        placed = _placed(t)
        dist.all_reduce(placed, op=op, group=group)
        _copy_back(t, placed)
    return t


def _gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather along dim 0 on the collective device: x [B, ...] -> [W*B, ...] (same B on every rank)."""
    placed = _placed(x)
    parts = [torch.empty_like(placed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, placed, group=group)
    return torch.cat(parts, dim=0)


def broadcast_object_list(objects: list, src: int = 0, group=None) -> list:
    """Global rank ``src``'s picklable ``objects`` on every rank (in place; returns the list)."""
    if _active(group):
        dist.broadcast_object_list(objects, src=src, group=group, device=collective_device())
    return objects


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not _active(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)  # torch pickles onto the current device (set at start-up)
    return out


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; under MPI the launcher's local rank)."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of ITS OWN rows, summed
    over every rank's loss (each rank's loss depends on every rank's rows through the negatives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # x: [B, D] -> [W*B, D]
        ctx.group = group
        ctx.rows = x.shape[0]
        ctx.device = x.device
        return _to(_gather_rows(x, group), x.device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: [W*B, D]
        grad = all_reduce(grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        me = dist.get_rank(ctx.group)
        return grad[me * ctx.rows : (me + 1) * ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank of ``group`` along dim 0, gradient-correct.
    Every rank must pass the same B. A world of one returns ``x`` unchanged."""
    if not _active(group):
        return x
    return _GatherWithGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Plain all-gather along dim 0 for tensors without gradient (frozen image embeddings)."""
    if not _active(group):
        return x
    return _to(_gather_rows(x, group), x.device)
