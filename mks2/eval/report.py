"""One evaluation run over several files -> one JSON report (written atomically)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mks2.eval.checkpoints import EvalModel
from mks2.eval.data import read_gallery, read_mc, read_open
from mks2.eval.tasks import evaluate_mc, evaluate_open, evaluate_retrieval
from mks2.fileio import atomic_write_text


def _name(path: str) -> str:
    return Path(path).stem


def run_evaluation(
    em: EvalModel,
    *,
    mc: Sequence[str] = (),
    open_questions: Sequence[str] = (),
    retrieval: Sequence[str] = (),
    image_root: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int | None = None,
    answer_eos: bool = True,
    force_gates: Sequence[float] | None = None,
    keep_predictions: bool = True,
) -> dict[str, Any]:
    """Evaluate ``em`` on the given files. ``limit`` keeps the first N records of each file;
    ``force_gates`` fixes every MoME router's gates (e.g. ``[1, 0]``: MLP expert only) for the run."""
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "model": em.source,
        "kind": em.kind,
        "chat_template": em.chat_template,
        "stage": em.config.get("model", {}).get("stage"),
        "force_gates": list(force_gates) if force_gates is not None else None,
        "multiple_choice": {},
        "open": {},
        "retrieval": {},
    }
    if force_gates is not None:
        if not em.has_router:
            raise ValueError(f"--force-gates: {em.source} has no MoME router")
        em.model.force_gates(list(force_gates))
    try:
        for path in mc:
            items = read_mc(path)[:limit]
            res = evaluate_mc(em, items, batch_size=batch_size, eos=answer_eos, name=_name(path))
            if not keep_predictions:
                res.pop("predictions")
            report["multiple_choice"][_name(path)] = {"file": str(path), **res}
        for path in open_questions:
            items = read_open(path)[:limit]
            res = evaluate_open(em, items, batch_size=batch_size, max_new_tokens=max_new_tokens, name=_name(path))
            if not keep_predictions:
                res["outputs"] = res["outputs"][:5]
            report["open"][_name(path)] = {"file": str(path), **res}
        for path in retrieval:
            if image_root is None:
                raise ValueError("retrieval evaluation needs the image root (--image-root)")
            gallery = read_gallery(path)[:limit]
            res = evaluate_retrieval(em, gallery, image_root=image_root, batch_size=batch_size)
            report["retrieval"][_name(path)] = {"file": str(path), **res}
    finally:
        if force_gates is not None:
            em.model.force_gates(None)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """Write the report as indented JSON through a temporary file + rename."""
    atomic_write_text(Path(path).expanduser(), json.dumps(report, indent=2) + "\n")
