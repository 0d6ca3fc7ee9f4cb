"""Collation: rows of samples -> the batch contract of the trainer and model.

Each row is a tuple of samples (one, or several when packing), each a dict with ``input_ids`` int32
[L], ``loss_mask`` int8 [L] and ``pixel_values`` ([3, H, W] tensor, or None for a text-only sample).
Per row:

- every image placeholder id is expanded to ``P = num_prefix_tokens`` copies (the model splices the
  image prefix there, in row-major order, so ``pixel_values`` lists the images in that order);
- samples are laid out one after the other; ``segment_ids`` numbers them 1, 2, ... (0 = padding) and
  ``position_ids`` restart at 0 in each, so with the model's segment-aware causal mask no token
  attends across documents;
- ``labels`` equal ``input_ids`` where the loss mask is 1 and are -100 elsewhere (prompt, BOS, image
  prefix, padding); the model shifts them (HF convention). A document's first label is always -100
  (BOS), so no loss crosses a document boundary either.
- The row is padded (``pad_id``, segment 0, label -100) or truncated to ``seq_len``; a truncation that
  would cut through an image prefix is an error, an image cut off entirely is dropped with its pixels.

With ``retrieval=True`` (stage 1 captions; one captioned image per row) the batch also carries the
caption without the image: ``ret_input_ids``/``ret_position_ids``/``ret_segment_ids`` [B, S_r] with
``S_r = seq_len - P + 1`` and ``ret_eos_index`` [B], the index of the final EOS (kept even when the
caption is truncated). Row b of the retrieval view belongs to image b of ``pixel_values``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mks2.constants import IGNORE_INDEX

log = logging.getLogger(__name__)


class Collator:
    def __init__(
        self,
        *,
        seq_len: int,
        num_prefix_tokens: int = 0,
        image_token_id: int = -200,
        pad_id: int = 0,
        eos_id: int = 2,
        retrieval: bool = False,
    ):
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if num_prefix_tokens and seq_len < num_prefix_tokens + 2:
            raise ValueError(
                f"data.seq_len={seq_len} cannot hold an image prefix of {num_prefix_tokens} tokens plus BOS and a token"
            )
        if retrieval and num_prefix_tokens < 1:
            raise ValueError("the retrieval view needs image samples (num_prefix_tokens >= 1)")
        self.seq_len = seq_len
        self.P = num_prefix_tokens
        self.image_token_id = image_token_id
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.retrieval = retrieval
        self.ret_len = seq_len - num_prefix_tokens + 1 if retrieval else 0
        self._warned = False

    def _expand(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids [L'], labels [L']) with each placeholder repeated P times."""
        is_img = ids == self.image_token_id
        labels = np.where((mask != 0) & ~is_img, ids, IGNORE_INDEX).astype(np.int64)
        if not is_img.any():
            return ids.astype(np.int64), labels
        if self.P == 0:
            raise ValueError("a sample holds an image placeholder but num_prefix_tokens is 0 (no vision front-end)")
        reps = np.where(is_img, self.P, 1)
        return np.repeat(ids.astype(np.int64), reps), np.repeat(labels, reps)

    def _row(self, row: Sequence[dict[str, Any]], out: dict[str, np.ndarray], b: int, images: list) -> None:
        S, cursor = self.seq_len, 0
        for k, sample in enumerate(row, start=1):
            if cursor >= S:
                break
            ids, labels = self._expand(np.asarray(sample["input_ids"]), np.asarray(sample["loss_mask"]))
            n_img = int(np.count_nonzero(np.asarray(sample["input_ids"]) == self.image_token_id))
            pixels = sample.get("pixel_values")
            if n_img != (0 if pixels is None else 1):
                raise ValueError(
                    f"sample has {n_img} image placeholder(s) but {'an' if pixels is not None else 'no'} image"
                )
            take = min(len(ids), S - cursor)
            if take < len(ids):
                if not self._warned:
                    log.warning("truncating a sample of %d tokens to fit data.seq_len=%d", len(ids), S)
                    self._warned = True
                if n_img and ids[take - 1] == self.image_token_id and ids[take] == self.image_token_id:
                    raise ValueError(
                        f"data.seq_len={S} cuts through an image prefix of {self.P} tokens; raise data.seq_len"
                    )
                if n_img and not np.any(ids[:take] == self.image_token_id):
                    pixels = None  # the whole image fell beyond seq_len
            sl = slice(cursor, cursor + take)
            out["input_ids"][b, sl] = ids[:take]
            out["labels"][b, sl] = labels[:take]
            out["position_ids"][b, sl] = np.arange(take)
            out["segment_ids"][b, sl] = k
            if pixels is not None:
                images.append(pixels)
            cursor += take

    def _retrieval_row(self, row: Sequence[dict[str, Any]], out: dict[str, np.ndarray], b: int) -> None:
        if len(row) != 1 or row[0].get("pixel_values") is None:
            raise ValueError("the retrieval view needs exactly one captioned image per row (the padded stage-1 layout)")
        ids = np.asarray(row[0]["input_ids"])
        text = ids[ids != self.image_token_id].astype(np.int64)
        if len(text) > self.ret_len:
            text = np.concatenate([text[: self.ret_len - 1], [self.eos_id]])  # keep the final EOS
        n = len(text)
        out["ret_input_ids"][b, :n] = text
        out["ret_position_ids"][b, :n] = np.arange(n)
        out["ret_segment_ids"][b, :n] = 1
        out["ret_eos_index"][b] = n - 1

    def __call__(self, rows: Sequence[Sequence[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        B, S = len(rows), self.seq_len
        out = {
            "input_ids": np.full((B, S), self.pad_id, dtype=np.int64),
            "labels": np.full((B, S), IGNORE_INDEX, dtype=np.int64),
            "position_ids": np.zeros((B, S), dtype=np.int64),
            "segment_ids": np.zeros((B, S), dtype=np.int32),
        }
        if self.retrieval:
            R = self.ret_len
            out |= {
                "ret_input_ids": np.full((B, R), self.pad_id, dtype=np.int64),
                "ret_position_ids": np.zeros((B, R), dtype=np.int64),
                "ret_segment_ids": np.zeros((B, R), dtype=np.int32),
                "ret_eos_index": np.zeros(B, dtype=np.int64),
            }
        images: list[torch.Tensor] = []
        for b, row in enumerate(rows):
            self._row(row, out, b, images)
            if self.retrieval:
                self._retrieval_row(row, out, b)
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        if images:
            batch["pixel_values"] = torch.stack(images)  # [N_img, 3, H, W], row-major order
        return batch


def attention_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool: query i may attend key j (causal, same segment, not padding). The mask the model
    builds from ``segment_ids``; used by tests and debugging tools."""
    S = segment_ids.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    return causal & same & real
