"""Deterministic PIL rendering of demo scenes: 96 x 96 RGB, one 32 x 32 grid cell per object.

Drawing uses integer coordinates and no anti-aliasing, so the pixels depend only on the scene;
PNGs are written without timestamps, so the files are byte-identical across runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mks2.demo.world import COLOURS, Scene

IMAGE_SIZE = 96
CELL = IMAGE_SIZE // 3  # 32: equals the vision tower's patch size, so cell == patch
RADIUS = {"small": 7, "large": 13}  # + jitter <= 2 keeps every object inside its cell


def _polygon(shape: str, cx: int, cy: int, r: int) -> list[tuple[int, int]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + round(rad * math.cos(ang)), cy + round(rad * math.sin(ang))))
        return pts
    raise AssertionError(f"no polygon for shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene: plain grey background, each object as a filled shape in its cell."""
    g = scene.background
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (g, g, g))
    draw = ImageDraw.Draw(img)
    for item, (dx, dy) in zip(scene.items, scene.jitter):
        row, col = divmod(item.cell, 3)
        cx, cy = col * CELL + CELL // 2 + dx, row * CELL + CELL // 2 + dy
        r = RADIUS[item.size]
        fill = COLOURS[item.obj.colour]
        if item.obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif item.obj.shape == "square":
            s = round(r * 0.85)  # same visual area class as the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_polygon(item.obj.shape, cx, cy, r), fill=fill)
    return img


def save_png(img: Image.Image, path: Path) -> None:
    # Fixed compression settings and no metadata chunks: identical bytes for identical pixels.
    img.save(path, format="PNG", optimize=False, compress_level=6)


def to_array(img: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8."""
    return np.asarray(img, dtype=np.uint8)
