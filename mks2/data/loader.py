"""``build_dataloader``: what the trainer calls to get batches.

Signature::

    build_dataloader(cfg, *, rank, world_size, stage=None, image_processor=None, num_prefix_tokens=0,
                     consumed_rows=0, state=None, split="train", batch_size=None, num_workers=None)
        -> MKS2DataLoader

- ``rank``/``world_size``: the DATA-PARALLEL rank and size (pipeline stages of one replica share a rank).
- ``stage``: ``cfg.model.stage`` by default. ``mvm`` (stage 1) needs caption datasets and adds the
  retrieval view: with ``data.packing`` as token-budget micro-batches of (caption, retrieval) pairs
  (``mks2.data.stage1_packing``; ``grad_accumulation_steps`` fixes the micro-batches per step), else one
  padded caption row and retrieval row per caption; other stages take any kind.
- ``image_processor``: a transformers image processor (the vision checkpoint's); required when a
  dataset holds images. ``num_prefix_tokens``: P, from ``mks2.model.vision.vision_prefix_length``.
- Resuming: ``state`` (a previous ``loader.state_dict()``) continues exactly; without it
  ``consumed_rows`` (rows consumed by all ranks together, i.e. steps x global batch) skips that many
  rows (replaying the row cuts when packing). Either works with a different ``world_size``. The state
  also says how many samples those rows held (``consumed_samples``: more than the rows when packing).
- ``split``: ``train`` (``data.datasets``: infinite, shuffled, mixed by weight, packed if
  ``data.packing``) or ``eval`` (``data.eval_datasets``: one ordered pass, one sample per row, padded
  by repetition so every rank runs the same number of batches).

``MKS2DataLoader`` iterates batches (the contract in ``mks2.data.collate``); ``state_dict()`` is the
sampler state after the last batch it handed out -- save it with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mks2.config import RunConfig, Stage
from mks2.data.collate import Collator
from mks2.data.dataset import PretokenizedDataset
from mks2.data.errors import DatasetError
from mks2.data.images import ImageLoader, find_placeholders
from mks2.data.sampler import DistributedSampler, EvalSampler, SampleStream, Unit, UnitStream


class RowDataset(torch.utils.data.Dataset):
    """Map-style dataset whose keys are units ((dataset, index), ...): returns the row's samples with
    images loaded and processed (runs in DataLoader workers)."""

    def __init__(self, datasets: Sequence[PretokenizedDataset], image_loaders: Sequence[ImageLoader | None]):
        self.datasets = list(datasets)
        self.image_loaders = list(image_loaders)

    def __len__(self) -> int:  # not used for sampling; the sampler is infinite
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, unit: Unit) -> list[dict[str, Any]]:
        samples = []
        for d, i in unit:
            ds = self.datasets[d]
            s = ds[i]
            pixels, loss_mask = None, s["loss_mask"]
            if s["image"] is not None:
                loader = self.image_loaders[d]
                if loader is None:
                    raise DatasetError(f"{ds.path} sample {i} has an image but no image processor was given")
                pixels, failure = loader.load(s["image"], where=f"{ds.path} sample {i}")
                if failure is not None:
                    # Undecodable: a tagged placeholder image and no loss on this sample. The sample keeps
                    # its place and its tokens, so shapes, packing and the sampler's accounting are what they
                    # would be; the step counts it (images_skipped) from the tag (mks2.data.images).
                    loss_mask = np.zeros_like(loss_mask)
            samples.append({"input_ids": s["input_ids"], "loss_mask": loss_mask, "pixel_values": pixels})
        return samples


class MKS2DataLoader:
    """Batches for one data-parallel rank, with an exact, DP-size-independent ``state_dict()``."""

    def __init__(self, loader: DataLoader, sampler: Any, batch_size: int, *, commit_per_batch: int | None = None):
        self.loader = loader
        self.sampler = sampler
        self.batch_size = batch_size
        self.skipped_images: list[str] = []  # see take_skipped_images
        # Units the sampler commits per batch handed out: B rows, or one packed stage-1 micro-batch.
        self._commit_count = batch_size if commit_per_batch is None else commit_per_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Start torch's iterator NOW, not at the first next(): it draws its worker base seed from the global
        # torch RNG, and a resumed run restores that RNG right after iter() -- a draw deferred to the first
        # batch would shift every later random number (dropout) against the uninterrupted run.
        return self._commit(iter(self.loader))

    def _commit(self, batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        for batch in batches:
            if "pixel_values" in batch:  # tags of undecodable images, read as the batch is handed out
                self.skipped_images += find_placeholders(batch["pixel_values"])[1]
            if not isinstance(self.sampler, EvalSampler):
                self.sampler.commit(self._commit_count)
            yield batch

    def __len__(self) -> int:
        if isinstance(self.sampler, EvalSampler):
            return len(self.sampler) // self.batch_size
        raise TypeError("the training loader is infinite")

    def take_skipped_images(self) -> list[str]:
        """Notes ("<file> (<reason>)") of the undecodable images in the batches handed out since the last
        call, in order; clears them. Their samples carried no loss (``mks2.data.images``)."""
        out, self.skipped_images = self.skipped_images, []
        return out

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.sampler, EvalSampler):
            raise TypeError("the eval loader has no resumable state")
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sampler, EvalSampler):
            raise TypeError("the eval loader has no resumable state")
        self.sampler.load_state_dict(state)


def _refuse_demo_placeholders(cfg: RunConfig, sources: Sequence[Any]) -> None:
    """The loader reads real paths only: ``demo:NAME`` / ``demo`` placeholders are the launchers' job
    (``mks2.demo.resolve``), so production data loading never builds or imports the demo world."""
    placeholders = [str(s.path) for s in sources if str(s.path).startswith("demo:")]
    if cfg.data.tokenizer in ("demo", "demo:tokenizer"):
        placeholders.append(f"data.tokenizer={cfg.data.tokenizer}")
    if placeholders:
        raise DatasetError(
            f"demo placeholder(s) {', '.join(placeholders)} have not been resolved: call mks2.demo.resolve(cfg) "
            "before building the loader (the launchers do)"
        )


def open_datasets(cfg: RunConfig, split: str, *, verify_hashes: bool | None = None) -> tuple[list, list[float]]:
    """Open (and check) the datasets of a split; returns (datasets, weights)."""
    sources = cfg.data.datasets if split == "train" else cfg.data.eval_datasets
    if not sources:
        key = "data.datasets" if split == "train" else "data.eval_datasets"
        raise DatasetError(f"{key} is empty: nothing to load for split {split!r}")
    _refuse_demo_placeholders(cfg, sources)
    verify = cfg.data.verify_hashes if verify_hashes is None else verify_hashes
    datasets = [
        PretokenizedDataset(
            src.path,
            verify_hashes=verify,
            tokenizer=cfg.data.tokenizer,
            vocab_size=cfg.model.vocab_size,
            image_token_id=cfg.model.vision.image_token_id,
        )
        for src in sources
    ]
    fingerprints = {d.manifest["tokenizer"]["fingerprint"] for d in datasets}
    if len(fingerprints) > 1:  # possible when data.tokenizer is unset: then nothing else catches it
        listing = ", ".join(f"{d.path} ({d.manifest['tokenizer']['fingerprint'][:19]}...)" for d in datasets)
        raise DatasetError(f"the datasets were tokenized with different tokenizers: {listing}")
    template = getattr(cfg.data.chat_template, "value", cfg.data.chat_template)
    for d in datasets:
        built_with = d.manifest.get("params", {}).get("chat_template")
        if built_with is not None and built_with != template:
            raise DatasetError(
                f"{d.path} was pretokenized with chat template {built_with} but data.chat_template is {template}; "
                "prompts at evaluation would not match training (re-run pretokenize or set data.chat_template)"
            )
    return datasets, [float(src.weight) for src in sources]


def build_dataloader(
    cfg: RunConfig,
    *,
    rank: int,
    world_size: int,
    stage: Stage | str | None = None,
    image_processor: Any = None,
    num_prefix_tokens: int = 0,
    consumed_rows: int = 0,
    state: dict[str, Any] | None = None,
    split: str = "train",
    batch_size: int | None = None,
    num_workers: int | None = None,
    grad_accumulation_steps: int = 1,
) -> MKS2DataLoader:
    """See the module docstring."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    stage = Stage(stage if stage is not None else cfg.model.stage)
    datasets, weights = open_datasets(cfg, split)
    seq_len, packing = cfg.data.seq_len, cfg.data.packing and split == "train"
    retrieval = stage == Stage.MVM
    if retrieval:
        wrong = [f"{d.path} ({d.kind})" for d in datasets if d.kind != "caption"]
        if wrong:
            raise DatasetError(f"stage mvm trains on caption datasets; got {', '.join(wrong)}")
    with_images = [d for d in datasets if d.has_images]
    if with_images and (image_processor is None or num_prefix_tokens < 1):
        raise DatasetError(
            f"{with_images[0].path} holds images: pass the vision checkpoint's image_processor and "
            f"num_prefix_tokens >= 1 (got {num_prefix_tokens})"
        )
    tok = datasets[0].manifest["tokenizer"]
    if retrieval and packing:
        return _packed_stage1_loader(cfg, datasets, weights, rank=rank, world_size=world_size, state=state,
                                     image_processor=image_processor, num_prefix_tokens=num_prefix_tokens,
                                     grad_accumulation_steps=grad_accumulation_steps,
                                     num_workers=num_workers)  # fmt: skip
    collator = Collator(
        seq_len=seq_len,
        num_prefix_tokens=num_prefix_tokens,
        image_token_id=cfg.model.vision.image_token_id,
        pad_id=tok["pad_id"] if tok.get("pad_id") is not None else 0,
        eos_id=tok["eos_id"],
        retrieval=retrieval,
    )
    # data.image_root overrides the --image-root each dataset was pretokenized with
    loaders = [
        ImageLoader(image_processor, cfg.data.image_root or d.manifest.get("image_root")) if d.has_images else None
        for d in datasets
    ]
    rows = RowDataset(datasets, loaders)
    B = batch_size or cfg.train.micro_batch_size
    if split == "train":
        P = num_prefix_tokens

        def length(d: int, i: int) -> int:
            return datasets[d].length(i) + (P - 1) * datasets[d].has_image(i) if P else datasets[d].length(i)

        stream = SampleStream([len(d) for d in datasets], weights=weights, seed=cfg.train.seed, shuffle=True)
        sampler: DistributedSampler | EvalSampler = DistributedSampler(
            UnitStream(stream, packing=packing, seq_len=seq_len, length=length), rank=rank, world_size=world_size
        )
        if state is not None:
            sampler.load_state_dict(state)
        elif consumed_rows:
            sampler.skip_rows(consumed_rows)
    else:
        sampler = EvalSampler([len(d) for d in datasets], rank=rank, world_size=world_size, batch_size=B)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    loader = DataLoader(
        rows,
        batch_size=B,
        sampler=sampler,  # type: ignore[arg-type]
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
    return MKS2DataLoader(loader, sampler, B)


def _packed_stage1_loader(
    cfg: RunConfig,
    datasets: list[PretokenizedDataset],
    weights: list[float],
    *,
    rank: int,
    world_size: int,
    state: dict[str, Any] | None,
    image_processor: Any,
    num_prefix_tokens: int,
    grad_accumulation_steps: int,
    num_workers: int | None,
) -> MKS2DataLoader:
    """Stage 1 with ``data.packing``: token-budget micro-batches of (caption, retrieval) pairs, a step of
    micro x dp x GAS captions planned identically on every rank (``mks2.data.stage1_packing``)."""
    from mks2.data.stage1_packing import PackedPairCollator, PackedStepSampler, PairDataset

    seq_len, P = cfg.data.seq_len, num_prefix_tokens
    rows = tokens_per_micro_batch(cfg) // seq_len
    tok = datasets[0].manifest["tokenizer"]
    collator = PackedPairCollator(
        seq_len=seq_len, rows=rows, num_prefix_tokens=P, image_token_id=cfg.model.vision.image_token_id,
        pad_id=tok["pad_id"] if tok.get("pad_id") is not None else 0, eos_id=tok["eos_id"],
    )  # fmt: skip
    loaders = [
        ImageLoader(image_processor, cfg.data.image_root or d.manifest.get("image_root")) if d.has_images else None
        for d in datasets
    ]
    stream = SampleStream([len(d) for d in datasets], weights=weights, seed=cfg.train.seed, shuffle=True)
    sampler = PackedStepSampler(
        stream,
        rank=rank,
        world_size=world_size,
        grad_accumulation_steps=grad_accumulation_steps,
        captions_per_step=cfg.train.micro_batch_size * world_size * grad_accumulation_steps,
        rows=rows,
        seq_len=seq_len,
        num_prefix_tokens=P,
        length=lambda d, i: datasets[d].length(i),
        where=lambda d, i: f"{datasets[d].path} row {i}",
        refuse_long=getattr(cfg.data.long_captions, "value", cfg.data.long_captions) == "refuse",
    )
    if state is not None:
        sampler.load_state_dict(state)
    workers = cfg.data.num_workers if num_workers is None else num_workers
    loader = DataLoader(
        PairDataset(RowDataset(datasets, loaders)),
        batch_sampler=sampler,  # type: ignore[arg-type]
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    return MKS2DataLoader(loader, sampler, cfg.train.micro_batch_size, commit_per_batch=1)


def tokens_per_micro_batch(cfg: RunConfig) -> int:
    """The stage-1 packed budget: ``data.tokens_per_micro_batch``, or ``data.seq_len x train.micro_batch_size``."""
    return cfg.data.tokens_per_micro_batch or cfg.data.seq_len * cfg.train.micro_batch_size
