"""Image loading for loader workers: PIL decode + a transformers image processor -> [3, H, W] tensor."""

from __future__ import annotations

import os
from typing import Any

import torch

from mks2.data.errors import DatasetError


class ImageLoader:
    """Loads ``image_root/relative_path`` as RGB and runs ``processor`` (e.g. ``CLIPImageProcessor``)
    on it. Picklable (spawned DataLoader workers get a copy)."""

    def __init__(self, processor: Any, image_root: str | None):
        self.processor = processor
        self.image_root = image_root

    def resolve(self, path: str) -> str:
        return os.path.join(self.image_root, path) if self.image_root else path

    def __call__(self, path: str, where: str = "") -> torch.Tensor:
        from PIL import Image

        full = self.resolve(path)
        try:
            with Image.open(full) as im:
                rgb = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{where}: cannot load image {full} ({type(exc).__name__}: {exc})") from exc
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]
        return pixels[0]
