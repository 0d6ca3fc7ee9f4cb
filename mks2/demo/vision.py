"""The demo vision tower: a tiny transformers ``CLIPVisionModel``, pre-trained at build time, then frozen.

A randomly initialised ViT separates the demo's scenes poorly, so the build pre-trains the tower for
a few seconds on its own rendered scenes (not the captioned ones) with a *visual* objective: every
patch token (one per grid cell, at every layer) predicts what is in its cell as a colour-shape class
and a size, and the pooled CLS output predicts which colour-shape classes, (class, size) pairs and
cells occur in the image. The labels are visual classes, never object names: the tower knows what
things look like, as CLIP would, and the LLM still has to learn which name goes with which look.
Image size 96, patch 32: CLS + 9 patch tokens, one patch per cell.

Training is deterministic (fixed seeds, one thread, a private RNG state) so the weights file is
byte-identical across builds on one machine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mks2.demo.render import IMAGE_SIZE, render, to_array
from mks2.demo.world import COLOURS, SHAPES, SIZES, Scene, random_scene

PATCH_SIZE = 32
HIDDEN = 64
# OpenAI CLIP's normalisation constants (what a CLIP image processor does by default).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# Pre-training targets. Per patch (= grid cell): what is there, as a colour-shape class (0 = empty,
# 1..30) and a size class (0 = empty, 1..2). Per image, from the pooled CLS output: multi-hot presence
# of each colour-shape class, of each (class, size) and of each occupied cell.
N_KINDS = len(COLOURS) * len(SHAPES)
N_PATCH_LOGITS = (N_KINDS + 1) + (len(SIZES) + 1)
N_SCENE_LABELS = N_KINDS + N_KINDS * len(SIZES) + 9


@dataclass(frozen=True, kw_only=True)
class TowerRecipe:
    seed: int = 7
    n_images: int = 3000
    n_eval_images: int = 500
    steps: int = 400
    batch_size: int = 128
    lr: float = 3e-3


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        projection_dim=HIDDEN,
        attention_dropout=0.0,
    )


def preprocessor_config() -> dict:
    """A CLIP image processor config that maps a 96x96 demo PNG to exactly ``pixel_values`` below."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_convert_rgb": True,
    }


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32, normalised as the image processor does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _kind(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def patch_labels(scene: Scene) -> np.ndarray:
    """[9, 2] int64: (colour-shape class, size class) per cell, 0 where the cell is empty."""
    lab = np.zeros((9, 2), dtype=np.int64)
    for p in scene.items:
        lab[p.cell] = (_kind(p.obj.colour, p.obj.shape) + 1, SIZES.index(p.size) + 1)
    return lab


def scene_labels(scene: Scene) -> np.ndarray:
    """[N_SCENE_LABELS] float32 multi-hot: kinds present, (kind, size) present, occupied cells."""
    v = np.zeros(N_SCENE_LABELS, dtype=np.float32)
    for p in scene.items:
        k = _kind(p.obj.colour, p.obj.shape)
        v[k] = v[N_KINDS + k * len(SIZES) + SIZES.index(p.size)] = v[N_KINDS * (1 + len(SIZES)) + p.cell] = 1.0
    return v


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """[N, 96, 96, 3] uint8."""
    return np.stack([to_array(render(s)) for s in scenes])


def _scenes(rng: random.Random, n: int) -> list[Scene]:
    return [random_scene(rng, n_items=rng.randint(1, 4)) for _ in range(n)]


class _Trainer(nn.Module):
    """The tower's forward from precomputed patch embeddings, with the pre-training heads.

    The patch-embedding conv stays frozen at its random init (a fixed random projection of each
    32x32 patch, which already separates flat-coloured shapes), so its output is computed once for
    the whole training set and the steps only run the transformer (the conv dominates CPU time)."""

    def __init__(self, tower) -> None:
        super().__init__()
        self.tower = tower
        n_layers = len(tower.encoder.layers)
        self.patch_heads = nn.ModuleList(nn.Linear(HIDDEN, N_PATCH_LOGITS) for _ in range(n_layers))
        self.scene_head = nn.Linear(HIDDEN, N_SCENE_LABELS)

    @torch.no_grad()
    def embed_patches(self, scenes: Sequence[Scene], chunk: int = 256) -> torch.Tensor:
        """Render and embed scenes with the frozen conv -> [N, 9, D], a chunk at a time (the float
        pixels of all images would take ~0.1 MB each)."""
        conv = self.tower.get_input_embeddings()
        parts = [
            conv(pixel_values(render_batch(scenes[i : i + chunk]))).flatten(2).transpose(1, 2)
            for i in range(0, len(scenes), chunk)
        ]
        return torch.cat(parts)

    def forward(self, patches: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """patches [B, 9, D] -> (hidden states after each layer [B, 10, D], pooled CLS [B, D]);
        the same computation as ``CLIPVisionModel.forward`` (checked after training)."""
        t, emb = self.tower, self.tower.embeddings
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)  # [B, 1, D]
        h = t.pre_layrnorm(torch.cat([cls, patches], dim=1) + emb.position_embedding.weight)  # [B, 10, D]
        states = []
        for layer in t.encoder.layers:
            h = layer(h, None)
            states.append(h)
        return states, t.post_layernorm(h[:, 0])

    def losses(self, patches: torch.Tensor, plab: torch.Tensor, slab: torch.Tensor):
        """-> (total loss, [B, 9] last-layer patch correctness, [B, N_SCENE_LABELS] scene-label correctness)."""
        states, pooled = self(patches)
        ce = nn.functional.cross_entropy
        loss = nn.functional.binary_cross_entropy_with_logits(self.scene_head(pooled), slab) * 10.0
        for head, h in zip(self.patch_heads, states):
            logits = head(h[:, 1:])  # [B, 9, N_PATCH_LOGITS]
            kind, size = logits[..., : N_KINDS + 1], logits[..., N_KINDS + 1 :]
            loss = loss + ce(kind.reshape(-1, N_KINDS + 1), plab[..., 0].reshape(-1))
            loss = loss + ce(size.reshape(-1, size.shape[-1]), plab[..., 1].reshape(-1))
            patch_ok = (kind.argmax(-1) == plab[..., 0]) & (size.argmax(-1) == plab[..., 1])
        scene_ok = (self.scene_head(pooled) > 0) == (slab > 0.5)
        return loss, patch_ok, scene_ok


def pretrain_tower(recipe: TowerRecipe = TowerRecipe(), *, progress: bool = True):
    """Build and pre-train the tower; returns (frozen CLIPVisionModel in eval mode, metrics dict)."""
    from transformers import CLIPVisionModel

    rng = random.Random(recipe.seed)
    train_scenes, eval_scenes = _scenes(rng, recipe.n_images), _scenes(rng, recipe.n_eval_images)
    x_eval = pixel_values(render_batch(eval_scenes[:64]))  # [64, 3, 96, 96]: checks the forward
    y_train = [torch.from_numpy(np.stack([f(s) for s in train_scenes])) for f in (patch_labels, scene_labels)]
    y_eval = [torch.from_numpy(np.stack([f(s) for s in eval_scenes])) for f in (patch_labels, scene_labels)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reduction order (and so the bits of the weights) must not depend on cores
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            trainer = _Trainer(CLIPVisionModel(vision_config()))
            trainer.tower.get_input_embeddings().requires_grad_(False)
            p_train = trainer.embed_patches(train_scenes)  # [N, 9, D]
            p_eval = trainer.embed_patches(eval_scenes)
            params = [p for p in trainer.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
            gen = torch.Generator().manual_seed(recipe.seed)
            trainer.train()
            bar = tqdm(range(recipe.steps), desc="demo: pre-training vision tower", disable=not progress, leave=False)
            for _ in bar:
                idx = torch.randint(0, len(p_train), (recipe.batch_size,), generator=gen)
                loss = trainer.losses(p_train[idx], y_train[0][idx], y_train[1][idx])[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            trainer.eval()
            with torch.no_grad():
                _, patch_ok, scene_ok = trainer.losses(p_eval, *y_eval)
                pooled = trainer(p_eval[:64])[1]
                reference = trainer.tower(pixel_values=x_eval).pooler_output
    finally:
        torch.set_num_threads(threads)
    # Internal invariant: we trained the function transformers computes (guards a changed HF forward).
    assert torch.allclose(pooled, reference, atol=1e-4), (pooled - reference).abs().max()
    tower = trainer.tower.requires_grad_(False).eval()
    metrics = {
        "final_train_loss": round(float(loss.item()), 4),
        "eval_patch_accuracy": round(float(patch_ok.float().mean()), 4),
        "eval_scene_label_accuracy": round(float(scene_ok.float().mean()), 4),
        "recipe": recipe.__dict__,
    }
    return tower, metrics


def save_tower(tower, metrics: dict, out_dir: Path) -> None:
    """Write a loadable transformers directory: config.json, model.safetensors, preprocessor_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(), indent=2, sort_keys=True) + "\n"
    )
    (out_dir / "pretraining.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
