"""Gradient-correct all-gather of the retrieval negatives, checked on 2 real torchrun ranks against
the single-process loss of the whole batch (also with a different pair count per rank: packed stage 1);
and Slurm's environment mapping."""

from __future__ import annotations

import pytest

from mks2.training import distributed
from tests.launching import REPO, run, tail


@pytest.mark.slow
def test_gathered_infonce_gradients_match_the_global_batch():
    script = REPO / "tests" / "training" / "scripts" / "check_contrastive_grad.py"
    result = run("torchrun", 2, [], script=script, timeout=120)
    assert result.returncode == 0, tail(result)
    assert "rank 0: OK" in result.output and "rank 1: OK" in result.output


def test_single_process_gather_is_identity():
    import torch

    x = torch.randn(2, 3, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x


def test_slurm_variables_are_mapped_only_without_another_launcher(monkeypatch):
    import os

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the mapping writes variables: keep them local
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.7")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    assert distributed.map_slurm_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "1")
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)
    assert os.environ["MASTER_ADDR"] in ("node01", "10.0.0.7")  # scontrol if present, else the launch node
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")  # under mpirun, mpi4py discovery wins
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var)
    assert distributed.map_slurm_env() is False
    assert "RANK" not in os.environ
