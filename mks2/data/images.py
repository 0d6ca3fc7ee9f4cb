"""Image loading for loader workers: PIL decode + a transformers image processor -> [3, H, W] tensor.

An image that cannot be read or decoded (missing, truncated, not an image) does NOT raise: one bad
file must not stop one rank while the others wait in a collective. The loader returns a *placeholder*
of the processor's output shape instead, and the sample's loss mask is zeroed (``mks2.data.loader``).

The placeholder carries its own tag, so it survives any collation (row layout, packing) unchanged:

    flat[:TAG_LEN]            a fixed pseudo-random pattern (no decoded image reproduces 16 exact floats)
    flat[TAG_LEN]             n, the length of the note below in bytes
    flat[TAG_LEN+1 : +1+n]    the note ("<file> (<reason>)", UTF-8) as bytes / 255
    the rest                  0

``find_placeholders(pixel_values)`` reads the tags back from a collated batch: which images are
placeholders and the note of each. The frozen vision front-end zeroes a placeholder's features and
pooled embedding (``mks2.training.frozen_vision``), which drops it from the stage-1 retrieval loss.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from mks2.data.errors import DatasetError

log = logging.getLogger(__name__)

TAG_LEN = 16
_TAG = torch.rand(TAG_LEN, generator=torch.Generator().manual_seed(0x6D6B7332)) * 2 - 1  # fixed; no global RNG
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError)


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # DecompressionBombError is an Exception of its own (a huge image is as unusable as a broken one)
    return (*_DECODE_ERRORS, Image.DecompressionBombError)


def placeholder(shape: torch.Size | tuple[int, ...], note: str) -> torch.Tensor:
    """A tagged float32 tensor of ``shape`` ([3, H, W]) standing in for an image that failed; ``note``
    (cut from the left to what fits) travels with it."""
    flat = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.float32)
    room = flat.numel() - TAG_LEN - 1
    if room < 0:
        raise ValueError(f"an image of shape {tuple(shape)} is too small to carry a placeholder tag")
    data = note.encode("utf-8")
    if len(data) > room:
        data = b"..." + data[len(data) - room + 3 :]
    flat[:TAG_LEN] = _TAG
    flat[TAG_LEN] = len(data)
    flat[TAG_LEN + 1 : TAG_LEN + 1 + len(data)] = torch.tensor(list(data), dtype=torch.float32) / 255.0
    return flat.reshape(shape)


def is_placeholder(pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [N, 3, H, W] -> bool [N]: which are placeholders (reads the first TAG_LEN values of each)."""
    flat = pixel_values.reshape(pixel_values.shape[0], -1)
    if flat.shape[1] <= TAG_LEN:
        return torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    return (flat[:, :TAG_LEN] == _TAG.to(device=flat.device, dtype=flat.dtype)).all(dim=1)


def find_placeholders(pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """pixel_values [N, 3, H, W] -> (is_placeholder bool [N], the notes of the placeholders in order)."""
    hit = is_placeholder(pixel_values)
    if not hit.any():
        return hit, []
    flat = pixel_values.reshape(pixel_values.shape[0], -1)
    notes = []
    for row in flat[hit].float().cpu():
        n = int(row[TAG_LEN].item())
        data = bytes(int(round(v * 255.0)) for v in row[TAG_LEN + 1 : TAG_LEN + 1 + n].tolist())
        notes.append(data.decode("utf-8", errors="replace"))
    return hit, notes


class ImageLoader:
    """Loads ``image_root/relative_path`` as RGB and runs ``processor`` (e.g. ``CLIPImageProcessor``)
    on it. Picklable (spawned DataLoader workers get a copy)."""

    def __init__(self, processor: Any, image_root: str | None):
        self.processor = processor
        self.image_root = image_root
        self._shape: torch.Size | None = None  # the processor's output shape, for placeholders

    def resolve(self, path: str) -> str:
        return os.path.join(self.image_root, path) if self.image_root else path

    def _process(self, rgb: Any) -> torch.Tensor:
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]  # [3, H, W]
        self._shape = pixels.shape
        return pixels

    def output_shape(self) -> torch.Size:
        """[3, H, W] of the processor's output (from a blank image the first time it is needed)."""
        if self._shape is None:
            from PIL import Image

            self._process(Image.new("RGB", (64, 64)))
        assert self._shape is not None
        return self._shape

    def load(self, path: str, where: str = "", *, quiet: bool = False) -> tuple[torch.Tensor, str | None]:
        """(pixels [3, H, W], None), or (a tagged placeholder, the note naming the file and the reason)
        when the file cannot be read or decoded. Deterministic: the same file gives the same answer."""
        from PIL import Image

        full = self.resolve(path)
        try:
            with Image.open(full) as im:
                rgb = im.convert("RGB")  # forces the full decode: a truncated file fails here
        except _decode_errors() as exc:
            note = f"{full} ({type(exc).__name__}: {exc})"
            if not quiet:
                log.warning("%s: cannot decode image, the sample is skipped: %s", where or "loader", note)
            return placeholder(self.output_shape(), note), note
        return self._process(rgb), None

    def __call__(self, path: str, where: str = "") -> torch.Tensor:
        """Strict loading (the evaluators): pixels [3, H, W], or ``DatasetError`` naming the file."""
        pixels, failure = self.load(path, where, quiet=True)
        if failure is not None:
            raise DatasetError(f"{where}: cannot load image {failure}")
        return pixels
