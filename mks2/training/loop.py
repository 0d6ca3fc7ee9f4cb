"""The training loop shared by every stage: one optimizer step at a time, in either parallel mode.

``run_training(cfg, task)`` = start the process group -> validate (world size, paths) -> choose and
check the checkpoint to resume -> build the engine -> restore -> loop { step, evaluate, log, save }
-> final save. The stage-specific part (batch -> losses) is the ``StageTask``; the loop owns
checkpointing, exact resume, non-finite-step skipping, preemption, and logging.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mks2 import checkpoint as ckpt
from mks2.config import ConfigError, Offload, ParallelMode, RunConfig, to_dict
from mks2.model import apply_config_from_hf
from mks2.training import distributed, faults
from mks2.training.batch import check_world_size, data_parallel_size, pipeline_stages, resolve_global_batch
from mks2.training.data_check import verify_data_once_per_node
from mks2.training.engine import TrainingEngine, build_engine
from mks2.training.flops import FlopsModel
from mks2.training.metrics import MetricsLog, peak_flops_per_device
from mks2.training.monitoring import WandbRun, monitoring_problems
from mks2.training.summary import check_resume_target, log_data_summary
from mks2.training.task import BatchCounts, StageTask

log = logging.getLogger("mks2.training")


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (``mks2/trainer.json``)."""

    step: int = 0  # optimizer steps done (skipped ones included: their data was consumed)
    skipped_total: int = 0
    consecutive_skips: int = 0
    tokens_total: int = 0
    images_skipped_total: int = 0  # undecodable images over the run, all ranks (data.max_images_skipped)


def preflight(cfg: RunConfig, task: StageTask, world_size: int) -> None:
    """Config problems that depend on the world size or the stage, as ONE ConfigError, before any
    DeepSpeed engine exists."""
    problems = check_world_size(cfg, world_size) + task.check(cfg) + monitoring_problems(cfg)
    if problems:
        raise ConfigError(problems, source=f"run config (world size {world_size})")
    resolve_global_batch(cfg, world_size)  # a global batch that scales with the world size becomes one number


class Trainer:
    def __init__(self, cfg: RunConfig, task: StageTask, built: TrainingEngine):
        self.cfg, self.task, self.te = cfg, task, built
        self.engine = built.engine
        self.rank = distributed.rank()
        self.save_dir = Path(cfg.train.save_dir)
        self.state = TrainState()
        self.preempt = faults.PreemptionFlag()
        self.loader: Any = None
        self._iter: Any = None
        self._fed = BatchCounts()  # what the pipeline feed handed to the engine during this step
        self.last_saved: str | None = None
        self._preempt_all = False  # some rank got SIGTERM/SIGUSR1 (agreed through the per-step all-reduce)

    # ---- data -------------------------------------------------------------------------------

    def _needs_data(self) -> bool:
        return self.te.mode == ParallelMode.ZERO3 or self.te.is_first_stage or self.te.is_last_stage

    def _start_data(self, loader_state: Any) -> None:
        if not self._needs_data():
            return
        self.loader = self.task.build_loader(
            self.cfg, dp_rank=self.te.dp_rank, dp_size=self.te.dp_size, state=loader_state
        )
        if self.te.mode == ParallelMode.ZERO3:
            self._iter = iter(self.loader)
        else:
            self._iter = self._pipeline_feed(iter(self.loader))
            self.engine.set_dataiterator(self._iter)

    def _pipeline_feed(self, batches):
        for batch in batches:
            self._fed = self._fed + self.task.counts(batch)
            yield self.task.pipeline_tuples(self.task.prepare(batch, self.te.vision, self.te.device))

    # ---- resume -------------------------------------------------------------------------------

    def resume(self, tag: str | None) -> None:
        """Restore checkpoint ``tag`` (chosen and checked by :func:`plan_resume`), or start fresh."""
        if tag is None:
            self._start_data(None)
            return
        path = self.save_dir / tag
        trainer_state, _ = ckpt.read_meta(path)
        saved_dp = trainer_state.get("run", {}).get("data_parallel_size", self.te.dp_size)
        if saved_dp != self.te.dp_size:
            self._resume_resharded(tag, trainer_state, int(saved_dp))
            return
        # A zero3 checkpoint saved while the frozen towers were still inside the engine (no towers file) lists
        # them in its module state; this engine has none (they come from model.vision.path, as they always did).
        strict = not self.te.saves_towers or (path / ckpt.CLIENT_DIR / ckpt.TOWERS_FILE).is_file()
        with ckpt.safe_torch_load():  # DeepSpeed readers that bypass its checkpoint engine, too
            load_path, _ = self.engine.load_checkpoint(
                str(self.save_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                load_module_strict=strict,
            )  # fmt: skip
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {path}")
        rank_state = ckpt.load_rank_state(path, self.rank)
        self.state = TrainState(**trainer_state["loop"])
        self.last_saved = tag
        self._start_data(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing after this may draw random numbers
        if self.rank == 0:
            log.info("resumed from %s (step %d)", path, self.state.step)

    def _resume_resharded(self, tag: str, trainer_state: dict[str, Any], saved_dp: int) -> None:
        """Restore checkpoint ``tag`` written at data-parallel size ``saved_dp`` != this run's.

        - Optimizer state (fp32 masters, Adam moments and step, group hyper-parameters, loss scaler) is
          re-partitioned by ``ckpt.load_resharded``; in pipeline mode DeepSpeed's loader first reads the
          layer files, the LR scheduler and its counters (none of them depend on the data-parallel size).
        - Data: the sampler state is global (the same in every rank's file), so rank 0's continues the
          sample stream at the next unconsumed row, dealt over the new ranks; a step still takes
          ``train.global_batch_size`` rows (gradient accumulation follows the new size), so no sample is
          repeated or skipped.
        - Random streams: the saved ones belong to the old ranks; each rank is seeded from (train.seed,
          step, rank) instead, so the run stays reproducible from here but is not bit-identical to an
          uninterrupted one (dropout masks differ)."""
        path = self.save_dir / tag
        with ckpt.safe_torch_load():  # DeepSpeed readers that bypass its checkpoint engine, too
            if self.te.mode == ParallelMode.PIPELINE:
                load_path, _ = self.engine.load_checkpoint(
                    str(self.save_dir), tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True
                )
                if load_path is None:
                    raise ckpt.CheckpointError(f"DeepSpeed could not load {path}")
            pipeline = self.te.mode == ParallelMode.PIPELINE
            ckpt.load_resharded(self.engine, path, mp_rank=self.te.pp_stage, module_loaded=pipeline)
        self.state = TrainState(**trainer_state["loop"])
        self.last_saved = tag
        loader_state = ckpt.load_rank_state(path, 0)["loader"]  # rank 0 always reads data (stage 0)
        self._start_data(loader_state)
        ckpt.seed_rng(self.cfg.train.seed, self.state.step, self.rank)  # last, as in resume()
        if self.rank == 0:
            log.warning(
                "resumed from %s (step %d) on another data-parallel size: checkpoint %d, now %d (world size "
                "%s -> %d); optimizer state re-partitioned, the sample stream continues at row %s",
                path, self.state.step, saved_dp, self.te.dp_size, trainer_state.get("run", {}).get("world_size", "?"),
                distributed.world_size(), (loader_state or {}).get("consumed_rows", "?"),
            )  # fmt: skip

    # ---- one optimizer step -------------------------------------------------------------------

    def _step_zero3(self) -> tuple[torch.Tensor, BatchCounts]:
        """One optimizer step of gradient-accumulated micro-batches -> (0-d loss sum over them, what this
        rank's micro-batches made the model compute)."""
        engine, te = self.engine, self.te
        loss_sum = torch.zeros((), device=te.device)
        counts = BatchCounts()
        for _ in range(te.gradient_accumulation_steps):
            batch = next(self._iter)
            counts = counts + self.task.counts(batch)  # host-side counts of the loader batch: no device sync
            loss = engine(**self.task.prepare(batch, te.vision, te.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        return loss_sum, counts

    def _step_pipeline(self) -> tuple[torch.Tensor, BatchCounts]:
        self._fed = BatchCounts()
        loss = self.engine.train_batch()
        micro = self.te.gradient_accumulation_steps
        # train_batch returns the step's mean loss on every stage; scale to a per-micro-batch sum so the
        # reduction below treats both modes alike (only last-stage ranks contribute it).
        contrib = loss.detach().float().to(self.te.device) * micro if self.te.is_last_stage else 0.0
        return torch.as_tensor(contrib, device=self.te.device), self._fed

    def train_step(self) -> dict[str, Any]:
        te = self.te
        step = self.state.step + 1
        faults.set_context(step=step, rank=self.rank)
        lr = float(self.engine.get_lr()[0])
        t0 = time.perf_counter()
        loss_sum, counts = self._step_pipeline() if te.mode == ParallelMode.PIPELINE else self._step_zero3()
        applied = bool(self.engine.was_step_applied())
        metric_sum, micro = self.task.sink.drain(te.device)
        # ONE all-reduce per step, on the engine's device (NCCL takes no CPU tensor):
        # [loss, metrics..., micro-batches, skipped, preempt, counts...]. Counts come from the ranks that
        # read the batches (every rank in zero3, one pipeline stage per data-parallel replica), so the sum
        # is over the data-parallel ranks and the step's micro-batches.
        contributes_loss = te.mode == ParallelMode.ZERO3 or te.is_last_stage
        counts_data = te.mode == ParallelMode.ZERO3 or te.is_first_stage
        k = len(self.task.metric_names)
        vec = torch.cat(
            [
                loss_sum.reshape(1) if contributes_loss else torch.zeros(1, device=te.device),
                metric_sum,
                torch.tensor(
                    [
                        micro if contributes_loss else 0,
                        0 if applied else 1,
                        1 if self.preempt.requested else 0,
                        *(counts if counts_data else BatchCounts()).as_list(),
                    ],
                    dtype=torch.float64,  # counts of a 256-GPU step exceed float32's exact integers
                    device=te.device,
                ),
            ]
        ).double()
        distributed.all_reduce(vec)
        elapsed = time.perf_counter() - t0
        host = vec.tolist()  # one device -> host copy
        n_micro = max(host[1 + k], 1.0)
        skipped_ranks = int(host[2 + k])
        skipped = skipped_ranks > 0
        self._preempt_all = host[3 + k] > 0
        total = BatchCounts.from_list(host[4 + k :])
        self.state.step = step
        self.state.tokens_total += total.tokens
        if skipped:
            self.state.skipped_total += 1
            self.state.consecutive_skips += 1
        else:
            self.state.consecutive_skips = 0
        record: dict[str, Any] = {"step": step, "loss": host[0] / n_micro}
        for i, name in enumerate(self.task.metric_names):
            record[name] = host[1 + i] / n_micro
        grad_norm = self.engine.get_global_grad_norm()
        record.update(
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            **step_accounting(total, elapsed, te.flops, self.cfg.train.precision.value, distributed.world_size()),
            step_time_s=elapsed,
            skipped=int(skipped),
            skipped_ranks=skipped_ranks,  # ranks whose engine discarded the update (all or none)
            skipped_total=self.state.skipped_total,
        )
        return record

    def _count_skipped_images(self, record: dict[str, Any]) -> list[str]:
        """The step's undecodable images over all ranks into ``record`` (``images_skipped``,
        ``images_skipped_total``); returns their notes (every rank the same list)."""
        te = self.te
        notes = self.loader.take_skipped_images() if self.loader is not None else []
        counts = te.mode == ParallelMode.ZERO3 or te.is_first_stage
        n, notes = faults.count_skipped_images(notes, counts=counts, device=te.device)
        self.state.images_skipped_total += n
        record.update(images_skipped=n, images_skipped_total=self.state.images_skipped_total)
        return notes

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self) -> str:
        tag = ckpt.tag_for(self.state.step)
        path = self.save_dir / tag
        if self.rank == 0 and path.exists() and not (path / ckpt.MARKER).exists():
            shutil.rmtree(path)  # debris of an interrupted save of this same step
        if self.rank == 0:
            warn_if_low_space(self.save_dir, self.last_saved)
        distributed.barrier()
        engine_failures = self.engine.checkpoint_engine.write_failures  # filled by a failed write (full disk)
        engine_failures.clear()
        self.engine.save_checkpoint(
            str(self.save_dir), tag=tag, client_state={"step": self.state.step}, save_latest=False
        )
        failures = list(engine_failures)
        try:
            loader_state = self.loader.state_dict() if self.loader is not None else None
            ckpt.save_rank_state(path, self.rank, loader_state)
            if self.rank == 0 and self.te.saves_towers:  # zero3: the frozen towers are not in DeepSpeed's files
                ckpt.save_towers(path, self.te.vision.front_end)
            if self.rank == 0:
                run = run_layout(self.cfg, distributed.world_size())
                run.update(world_size=distributed.world_size(), stage=self.task.stage.value)
                ckpt.write_meta(path, {"loop": asdict(self.state), "run": run}, self.te.resolved_config)
        except (OSError, RuntimeError) as exc:
            failures.append(ckpt.write_failure(getattr(exc, "filename", None) or path, exc))
        self._stop_if_save_failed(path, failures)  # also the point where every rank's files are written
        if self.rank == 0:
            ckpt.mark_complete(self.save_dir, path)
            ckpt.prune(self.save_dir, self.cfg.train.keep_last)
        distributed.barrier()
        self.last_saved = tag
        return tag

    def _stop_if_save_failed(self, path: Path, failures: list[str]) -> None:
        """All ranks agree whether any rank failed to write checkpoint ``path``; if one did, the partial
        directory is removed and every rank stops with one line (the failing rank names the file)."""
        failed = torch.tensor([1.0 if failures else 0.0], device=self.te.device)
        distributed.all_reduce(failed, op=distributed.ReduceOp.MAX)
        if failed.item() == 0:
            return
        free_mib = shutil.disk_usage(self.save_dir).free / 2**20  # at the failure, before the clean-up
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # every rank is past its writes (the all-reduce)
        last = self.last_saved or "none (no checkpoint was saved yet)"
        if not failures:
            raise ckpt.CheckpointWriteError(f"checkpoint {path.name}: another rank could not write its files")
        raise ckpt.CheckpointWriteError(
            f"checkpoint {path.name} could not be written: {failures[0]} ({free_mib:.1f} MiB free in "
            f"{self.save_dir}); the run stops at step {self.state.step}. Last complete checkpoint: {last} "
            "(metrics.jsonl kept); free some space and start again to resume from it"
        )

    # ---- the loop -----------------------------------------------------------------------------

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_interval
        if every < 0:
            return False
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    def fit(self) -> str:
        """Train to ``train.max_steps`` (or until preempted). Returns ``done`` or ``preempted``."""
        cfg = self.cfg.train
        metrics = MetricsLog(
            self.save_dir, enabled=self.rank == 0, total_steps=cfg.max_steps, start_step=self.state.step,
            monitor=getattr(self.engine, "monitor", None), log_interval=cfg.log_interval,
            wandb=WandbRun(self.cfg, resuming=self.last_saved is not None) if cfg.wandb and self.rank == 0 else None,
        )  # fmt: skip
        metrics.truncate_after(self.state.step)
        self.preempt.install()
        self.engine.train()
        try:
            while self.state.step < cfg.max_steps:
                record = self.train_step()
                step = self.state.step
                bad_images = self._count_skipped_images(record)  # collective; same answer on every rank
                if self._eval_due(step):
                    results = self.task.evaluate(self)
                    record.update(results)
                    if results:
                        metrics.message(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
                metrics.write(record)
                if bad_images:
                    metrics.message(
                        f"step {step}: {len(bad_images)} undecodable image(s) skipped (their samples carry no loss): "
                        + "; ".join(bad_images[:5])
                    )
                    faults.check_images_skipped(
                        total=self.state.images_skipped_total, cap=self.cfg.data.max_images_skipped, step=step,
                        notes=bad_images, last_saved=self.last_saved, save_dir=self.save_dir,
                    )  # fmt: skip
                if record["skipped"]:
                    metrics.message(f"step {step}: non-finite loss or gradient norm; update skipped on all ranks")
                    if self.state.consecutive_skips >= cfg.max_skipped_steps:
                        last = self.last_saved or "none (no checkpoint was saved yet)"
                        raise faults.TrainingAborted(
                            f"stopping at step {step}: {self.state.consecutive_skips} consecutive steps "
                            f"(steps {step - self.state.consecutive_skips + 1}-{step}) had a non-finite loss or "
                            f"gradient norm (train.max_skipped_steps={cfg.max_skipped_steps}). Last good checkpoint: "
                            f"{last} in {self.save_dir}. Lower train.lr or inspect the data of these steps."
                        )
                if self._preempt_all:
                    tag = self.save()
                    metrics.message(f"preemption signal received: saved {tag} at step {step}; exiting")
                    return "preempted"
                periodic = cfg.save_interval > 0 and step % cfg.save_interval == 0 and not record["skipped"]
                if periodic or step == cfg.max_steps:
                    self.save()
                faults.maybe_kill_after(step, self.rank)
            return "done"
        finally:
            self.preempt.uninstall()
            metrics.close()


def step_accounting(
    total: BatchCounts, elapsed: float, flops: FlopsModel | None, precision: str, world_size: int
) -> dict[str, Any]:
    """The step's throughput fields of ``metrics.jsonl`` from its counts summed over the data-parallel
    ranks and micro-batches (definitions: README "Observability" and ``mks2.training.flops``)."""
    out: dict[str, Any] = {
        "samples": total.samples,
        "tokens": total.tokens,
        "positions": total.positions,
        "padding_fraction": total.padding_fraction,
        "tokens_per_s": total.tokens / elapsed,
        "samples_per_s": total.samples / elapsed,
    }
    if flops is not None:
        out["flops"] = flops.step_flops(total)
        peak = peak_flops_per_device(precision)
        if peak is not None:
            out["mfu"] = out["flops"] / (elapsed * peak * world_size)
    return out


def warn_if_low_space(save_dir: Path, last_saved: str | None) -> None:
    """Warn when the filesystem of ``save_dir`` has less free space than the last checkpoint took (a
    cheap estimate of what the next save needs)."""
    if last_saved is None or not (save_dir / last_saved).is_dir():
        return
    needed = sum(f.stat().st_size for f in (save_dir / last_saved).rglob("*") if f.is_file())
    free = shutil.disk_usage(save_dir).free
    if free < needed:
        log.warning(
            "%s: %.1f MiB free, the last checkpoint (%s) took %.1f MiB: the next save may not fit",
            save_dir, free / 2**20, last_saved, needed / 2**20,
        )  # fmt: skip


def run_layout(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The parallel layout recorded in (and checked against) every checkpoint."""
    return {
        "mode": cfg.parallel.mode.value,
        "pipeline_stages": pipeline_stages(cfg),
        "data_parallel_size": data_parallel_size(cfg, world_size),
    }


def decided_on_rank0(decide: Callable[[], Any]) -> Any:
    """Run ``decide`` on rank 0 only; every rank returns its result, or raises the same
    CheckpointError it raised (so no rank waits forever on a rank that failed)."""
    answer: list[Any] = [None]
    if distributed.rank() == 0:
        try:
            answer[0] = ("ok", decide())
        except ckpt.CheckpointError as exc:
            answer[0] = ("error", str(exc))
    distributed.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ckpt.CheckpointError(value)
    return value


def claim_save_dir(cfg: RunConfig) -> ckpt.SaveDirLock | None:
    """Rank 0 takes ``train.save_dir``'s run lock (held until released) and removes incomplete
    checkpoints of dead runs; a busy save_dir is refused on every rank. The lock on rank 0, else None."""
    held: list[ckpt.SaveDirLock] = []

    def take() -> None:
        lock = ckpt.SaveDirLock(cfg.train.save_dir).acquire()
        held.append(lock)
        for note in lock.warnings:
            log.warning(note)

    decided_on_rank0(take)
    return held[0] if held else None


def layout_changes(saved: dict[str, Any], now: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Why checkpoint layout ``saved`` cannot be continued with layout ``now`` (empty: it can). Another
    data-parallel size is fine (the optimizer state is re-partitioned on load); another parallel mode or
    number of pipeline stages is not: each stage's files hold that stage's layers and optimizer slice."""
    out = []
    if saved.get("mode") != now["mode"]:
        out.append(
            f"parallel.mode: checkpoint {saved.get('mode')!r}, now {now['mode']!r} (set parallel.mode="
            f"{saved.get('mode')}, or convert the checkpoint with tools/convert_to_hf.py and start from it)"
        )
    elif saved.get("pipeline_stages") != now["pipeline_stages"]:
        stages = saved.get("pipeline_stages")
        out.append(
            f"parallel.pipeline_stages: checkpoint {stages}, now {now['pipeline_stages']} (a pipeline checkpoint "
            f"resumes only with the same number of stages: set parallel.pipeline_stages={stages} and use a "
            f"multiple of {stages} ranks)"
        )
    if saved.get("data_parallel_size") != now["data_parallel_size"] and cfg.parallel.offload == Offload.NVME:
        out.append(
            f"data_parallel_size: checkpoint {saved.get('data_parallel_size')}, now {now['data_parallel_size']} "
            "(with parallel.offload=nvme a resume needs the checkpoint's data-parallel size)"
        )
    return out


def plan_resume(cfg: RunConfig, world_size: int) -> str | None:
    """Resolve ``train.resume`` to a checkpoint tag (None: fresh start) and check that this run can
    continue it -- same model shape, parallel mode and pipeline stages (any data-parallel size) -- BEFORE
    any engine is built. Rank 0
    decides, every rank gets the same answer (or the same CheckpointError)."""

    def decide() -> str | None:
        found = ckpt.find_resume(cfg.train.save_dir, str(cfg.train.resume))
        if found is None:
            return None
        ckpt.check_checkpoint_files(found.path)  # no .pt needing code outside the allow-list
        trainer_state, saved_cfg = ckpt.read_meta(found.path)
        problems = ckpt.resume_changes(saved_cfg, resolved_config(cfg))
        saved_run, now = trainer_state.get("run", {}), run_layout(cfg, world_size)
        problems += layout_changes(saved_run, now, cfg)
        if problems:
            raise ckpt.CheckpointError(
                f"{found.path} cannot be resumed by this run; these settings differ:\n  - "
                + "\n  - ".join(problems)
                + "\nResume with the checkpoint's settings, or start a new run in another train.save_dir."
            )
        return found.tag

    return decided_on_rank0(decide)


def resolved_config(cfg: RunConfig) -> dict[str, Any]:
    """The config as the model will be built (architecture read from ``model.init_from`` if set), as a
    plain dict. Pure: ``cfg`` is left as it is, so the rank that plans the resume does not end up with a
    config the other ranks lack (``build_model`` applies ``model.init_from`` on every rank)."""
    if not cfg.model.init_from:
        return to_dict(cfg)
    return to_dict(apply_config_from_hf(copy.deepcopy(cfg), cfg.model.init_from))


def run_training(cfg: RunConfig, task: StageTask) -> str:
    """Everything after the config is loaded: distributed start-up, checks, engine, resume, loop."""
    distributed.init_distributed()
    preflight(cfg, task, distributed.world_size())
    lock = claim_save_dir(cfg)  # before anything reads or writes train.save_dir
    try:
        tag = plan_resume(cfg, distributed.world_size())
        if check_resume_target(cfg, tag):  # already at train.max_steps: said so (and how to continue)
            return "done"
        if distributed.rank() == 0:
            log_data_summary(cfg)
        verify_data_once_per_node(cfg)  # one rank per node hashes the shards, before any engine
        built = build_engine(cfg, task)
        if distributed.rank() == 0:
            log.info("%s", built.summary)  # to the screen and <save_dir>/logs/train.log
        trainer = Trainer(cfg, task, built)
        trainer.resume(tag)
        outcome = trainer.fit()
    finally:
        if lock is not None:
            lock.release()
    if outcome == "done" and distributed.rank() == 0:
        log.info("training finished at step %d; checkpoint %s", trainer.state.step, trainer.last_saved)
    return outcome
