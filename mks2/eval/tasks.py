"""The evaluations: multiple choice by log-likelihood, open questions by greedy generation, and
text-to-image retrieval recall@K for stage-1 models. Each returns a JSON-serialisable dict.

Multiple choice: every (question, choice) pair is scored as the summed log-probability of the choice's
tokens (+ EOS) after the prompt. ``acc`` picks the highest sum; ``acc_norm`` the highest per-token mean
(removes the bias toward short choices). Ties count as wrong (a model that gives every choice the same
score is at zero, not at chance), so a model that has learned nothing scores below the chance line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mks2.eval.checkpoints import EvalModel
from mks2.eval.data import MCItem, OpenItem, answer_ids, prompt_ids
from mks2.model.retrieval import recall_at_k as retrieval_recall


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad -> (ids [B, S], mask [B, S])."""
    s = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), s, dtype=torch.long)
    for b, x in enumerate(seqs):
        ids[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[b, : len(x)] = 1
    return ids, mask


def score_continuations(
    em: EvalModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 32,
    desc: str = "scoring",
    gates: list[torch.Tensor] | None = None,
) -> list[float]:
    """Summed log P(continuation | prompt) of each (prompt ids, continuation ids) pair.

    ``gates``: if a list is given and the model has MoME routers, the mean gate per expert over each
    batch's continuation tokens (averaged over layers) is appended to it as an [E] tensor."""
    out: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        chunk = pairs[start : start + batch_size]
        ids, mask = _pad([list(p) + list(c) for p, c in chunk], em.pad_id)
        logits, aux = em.forward(ids, mask)
        logp = F.log_softmax(logits[:, :-1], dim=-1)  # [B, S-1, V]: position t predicts token t+1
        target = ids[:, 1:].to(logp.device)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, S-1]
        cont = torch.zeros_like(tok_lp, dtype=torch.bool)
        for b, (p, c) in enumerate(chunk):
            cont[b, len(p) - 1 : len(p) + len(c) - 1] = True  # predictions of the continuation tokens
        out += (tok_lp * cont).sum(dim=1).tolist()
        if gates is not None and aux.get("gates"):
            g = torch.stack([aux["gates"][k] for k in sorted(aux["gates"])]).mean(0)  # [B, S, E]
            sel = torch.zeros(g.shape[:2], dtype=torch.bool, device=g.device)
            sel[:, 1:] = cont  # the gate at the continuation tokens themselves
            gates.append(g[sel].mean(0).cpu())
    return out


def _argmax_strict(scores: Sequence[float]) -> int | None:
    """Index of the unique maximum, None on a tie."""
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return winners[0] if len(winners) == 1 else None


def evaluate_mc(
    em: EvalModel, items: Sequence[MCItem], *, batch_size: int = 32, eos: bool = True, name: str = "mc"
) -> dict[str, Any]:
    """Accuracy (sum and per-token-mean log-likelihood) overall and per ``kind``; chance for reference."""
    pairs, owners, lengths = [], [], []
    for i, item in enumerate(items):
        p = prompt_ids(em.tokenizer, item.question, em.chat_template)
        for choice in item.choices:
            c = answer_ids(em.tokenizer, choice, eos=eos)
            pairs.append((p, c))
            owners.append(i)
            lengths.append(len(c))
    gates: list[torch.Tensor] = []
    scores = score_continuations(em, pairs, batch_size=batch_size, desc=name, gates=gates)
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for owner, s, n in zip(owners, scores, lengths):
        per_item[owner].append((s, n))
    by_kind: dict[str, list[tuple[bool, bool, float]]] = defaultdict(list)
    predictions = []
    for item, sc in zip(items, per_item):
        pick = _argmax_strict([s for s, _ in sc])
        pick_norm = _argmax_strict([s / n for s, n in sc])
        hit, hit_norm = pick == item.answer, pick_norm == item.answer
        by_kind[item.kind].append((hit, hit_norm, 1.0 / len(item.choices)))
        predictions.append({"id": item.id, "pred": pick, "answer": item.answer, "scores": [round(s, 4) for s, _ in sc]})
    rows = [r for rs in by_kind.values() for r in rs]

    def summary(rs: list[tuple[bool, bool, float]]) -> dict[str, float]:
        n = len(rs)
        return {
            "n": n,
            "acc": sum(r[0] for r in rs) / n,
            "acc_norm": sum(r[1] for r in rs) / n,
            "chance": sum(r[2] for r in rs) / n,
        }

    result: dict[str, Any] = {**summary(rows), "by_kind": {k: summary(v) for k, v in sorted(by_kind.items())}}
    if gates:
        result["mean_gates"] = [round(x, 4) for x in torch.stack(gates).mean(0).tolist()]
    result["predictions"] = predictions
    return result


@torch.no_grad()
def generate_greedy(em: EvalModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy continuations (without the prompt, stopping at EOS) of a batch of prompts. Recomputes the
    whole sequence per step (no cache): meant for short answers and small models."""
    eos = em.tokenizer.eos_id
    seqs = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        ids, mask = _pad([seqs[i] for i in live], em.pad_id)
        logits = em.logits(ids, mask)  # [B, S, V]
        last = mask.sum(1) - 1  # index of each row's last real token
        nxt = logits[torch.arange(len(live)), last.to(logits.device)].argmax(-1).tolist()
        for i, tok in zip(live, nxt):
            if tok == eos:
                done[i] = True
                continue
            seqs[i].append(tok)
            new[i].append(tok)
    return new


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def evaluate_open(
    em: EvalModel, items: Sequence[OpenItem], *, batch_size: int = 16, max_new_tokens: int = 16, name: str = "open"
) -> dict[str, Any]:
    """Exact match (normalised) and keyword hit rate (every keyword among the generated words)."""
    outputs: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc=name, leave=False):
        chunk = items[start : start + batch_size]
        prompts = [prompt_ids(em.tokenizer, it.question, em.chat_template) for it in chunk]
        outputs += [em.tokenizer.decode(x) for x in generate_greedy(em, prompts, max_new_tokens=max_new_tokens)]
    by_kind: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    samples = []
    for it, text in zip(items, outputs):
        words = set(_norm(text).split())
        exact = _norm(text) == _norm(it.answer)
        keyword = all(k in words for k in it.keywords)
        by_kind[it.kind].append((exact, keyword))
        samples.append({"id": it.id, "question": it.question, "answer": it.answer, "output": text})
    rows = [r for rs in by_kind.values() for r in rs]

    def summary(rs: list[tuple[bool, bool]]) -> dict[str, float]:
        return {"n": len(rs), "exact": sum(r[0] for r in rs) / len(rs), "keyword": sum(r[1] for r in rs) / len(rs)}

    return {**summary(rows), "by_kind": {k: summary(v) for k, v in sorted(by_kind.items())}, "outputs": samples}


def recall_at_k(text: torch.Tensor, image: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """text, image [N, E] L2-normalised, row i of each belongs together -> {"recall@K": ...}, through
    the one definition (``mks2.model.retrieval.recall_at_k``: ties are misses)."""
    return {f"recall@{k}": value for k, value in retrieval_recall(text, image, ks).items()}


@torch.no_grad()
def evaluate_retrieval(
    em: EvalModel, gallery: Sequence[tuple[str, str]], *, image_root: str, batch_size: int = 32
) -> dict[str, Any]:
    """Text-to-image recall@1/5 over a gallery, for a stage-1 (``mvm``) model: each caption alone
    (``BOS caption EOS``, as the stage-1 retrieval view) through the LLM + retrieval projection at the EOS,
    against every image's frozen pooled embedding."""
    from mks2.data.images import ImageLoader

    model = em.model
    if getattr(model, "retrieval", None) is None or getattr(model, "vision", None) is None:
        raise ValueError(f"{em.source}: text-to-image retrieval needs a stage-1 (mvm) model with a retrieval head")
    loader = ImageLoader(model.vision.image_processor(), image_root)
    texts, images = [], []
    for start in tqdm(range(0, len(gallery), batch_size), desc="retrieval", leave=False):
        chunk = gallery[start : start + batch_size]
        seqs = []
        for _, caption in chunk:
            ids = prompt_ids(em.tokenizer, caption, None)  # BOS caption
            seqs.append(ids + [em.tokenizer.eos_id])
        ids, mask = _pad(seqs, em.pad_id)
        hidden = model(input_ids=ids.to(em.device), attention_mask=mask.to(em.device), return_logits=False)
        eos_index = (mask.sum(1) - 1).to(em.device)
        texts.append(model.encode_text_for_retrieval(hidden.hidden_states, eos_index).float().cpu())
        pixels = torch.stack([loader(path, where=path) for path, _ in chunk]).to(em.device)
        images.append(model.encode_image_for_retrieval(pixels).float().cpu())
    text, image = torch.cat(texts), torch.cat(images)
    return {
        "n": len(gallery),
        **recall_at_k(text, image),
        "chance@1": 1.0 / len(gallery),
        "chance@5": min(1.0, 5 / len(gallery)),
    }
