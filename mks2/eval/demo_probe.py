"""Did stage 1 store the looks of the demo's objects? A probe through the stage-1 retrieval head.

For each of the demo world's 30 objects, the caption "a picture of a large NAME in the center" (text
only) goes through the stage-1 LLM and its retrieval head; the 30 candidate images are single large
objects of every colour-shape pair, rendered with the demo's own renderer. The caption's nearest image
names the colour and shape the model associates with NAME. For the 10 held-out objects those looks were
never written anywhere: only stage 1's images showed them.
"""

from __future__ import annotations

from typing import Any

import torch

from mks2.eval.checkpoints import EvalModel
from mks2.eval.data import prompt_ids


@torch.no_grad()
def stage1_looks_probe(em: EvalModel) -> dict[str, Any]:
    """Accuracy of the colour-shape class, the colour and the shape picked for held-out / training objects."""
    from mks2.demo.render import render
    from mks2.demo.world import OBJECTS, Placed, Scene

    model = em.model
    if getattr(model, "retrieval", None) is None:
        raise ValueError(f"{em.source}: the looks probe needs a stage-1 (mvm) model with a retrieval head")
    processor = model.vision.image_processor()
    images = [render(Scene(items=(Placed(o, "large", 4),), background=128, jitter=((0, 0),))) for o in OBJECTS]
    pixels = torch.cat([processor(images=im, return_tensors="pt")["pixel_values"] for im in images])
    image_emb = model.encode_image_for_retrieval(pixels.to(em.device))  # [30, E]
    seqs = [prompt_ids(em.tokenizer, f"a picture of a large {o.name} in the center", None) + [em.tokenizer.eos_id]
            for o in OBJECTS]  # fmt: skip
    length = max(len(s) for s in seqs)
    ids = torch.tensor([s + [em.pad_id] * (length - len(s)) for s in seqs], device=em.device)
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs], device=em.device)
    hidden = model(input_ids=ids, attention_mask=mask, return_logits=False).hidden_states
    text_emb = model.encode_text_for_retrieval(hidden, mask.sum(1) - 1)  # [30, E]
    pick = (text_emb @ image_emb.t()).argmax(dim=1).tolist()
    out: dict[str, Any] = {}
    for group, held in (("heldout", True), ("train", False)):
        idx = [i for i, o in enumerate(OBJECTS) if o.held_out == held]
        out[group] = {
            "n": len(idx),
            "class": sum(pick[i] == i for i in idx) / len(idx),
            "colour": sum(OBJECTS[pick[i]].colour == OBJECTS[i].colour for i in idx) / len(idx),
            "shape": sum(OBJECTS[pick[i]].shape == OBJECTS[i].shape for i in idx) / len(idx),
        }
    n_colours = len({o.colour for o in OBJECTS})
    n_shapes = len({o.shape for o in OBJECTS})
    out["chance"] = {"class": 1 / len(OBJECTS), "colour": 1 / n_colours, "shape": 1 / n_shapes}
    return out


@torch.no_grad()
def _last_hidden(em: EvalModel, texts: list[str], template: str | None) -> torch.Tensor:
    """Final-norm hidden state [N, D] at the last token of each prompt (caption + EOS when untemplated)."""
    eos = [em.tokenizer.eos_id] if template is None else []
    seqs = [prompt_ids(em.tokenizer, t, template) + eos for t in texts]
    length = max(len(s) for s in seqs)
    ids = torch.tensor([s + [em.pad_id] * (length - len(s)) for s in seqs], device=em.device)
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs], device=em.device)
    if em.kind == "hf":  # transformers: the last entry of hidden_states is the final norm's output
        hidden = em.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    else:
        hidden = em.model(input_ids=ids, attention_mask=mask, return_logits=False).hidden_states  # [N, S, D]
    return hidden[torch.arange(len(seqs)), mask.sum(1) - 1].float().cpu()


def _ridge_transfer(x: torch.Tensor, labels: list[str], train: list[int], test: list[int], ridge: float) -> float:
    """Fit a ridge classifier (one-hot targets) on ``train`` rows, return its accuracy on ``test`` rows."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(c) for c in labels])
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    a = z[train]
    w = torch.linalg.solve(a.t() @ a + ridge * torch.eye(a.shape[1]), a.t() @ torch.eye(len(classes))[y[train]])
    return ((z[test] @ w).argmax(1) == y[test]).float().mean().item()


def looks_linear_probe(em: EvalModel, *, ridge: float = 10.0) -> dict[str, Any]:
    """Where is the knowledge? A linear probe fit on the 20 training objects' hidden states predicts the
    colour / shape of the 10 held-out objects from theirs, at two places: the EOS of a stage-1-style caption
    ("a picture of a large NAME in the center") and the answer position of the evaluation's question
    ("What colour is a NAME?" in the chat template). Works for any model of ours (base, stage 1, stage 2)."""
    from mks2.demo.world import OBJECTS

    train = [i for i, o in enumerate(OBJECTS) if not o.held_out]
    test = [i for i, o in enumerate(OBJECTS) if o.held_out]
    places = {
        "caption_eos": ([f"a picture of a large {o.name} in the center" for o in OBJECTS], None),
        "question": ([f"What colour is a {o.name}?" for o in OBJECTS], em.chat_template or "llama2"),
    }
    out: dict[str, Any] = {"n_test": len(test)}
    for place, (texts, template) in places.items():
        x = _last_hidden(em, texts, template)
        out[place] = {
            "colour": _ridge_transfer(x, [o.colour for o in OBJECTS], train, test, ridge),
            "shape": _ridge_transfer(x, [o.shape for o in OBJECTS], train, test, ridge),
        }
    return out
