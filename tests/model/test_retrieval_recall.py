"""The one text-to-image recall@K: ties are misses, and training's held-out metric and ``mks2.eval``
report the same numbers."""

from __future__ import annotations

import pytest
import torch

from mks2.eval import recall_at_k as eval_recall
from mks2.model.retrieval import recall_at_k
from mks2.training.evaluate import retrieval_metrics


def test_a_tie_with_the_true_image_is_a_miss():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 are identical: captions 0, 1 tie
    assert recall_at_k(text, image, ks=(1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}
    collapsed = torch.ones(4, 2) / 2**0.5  # every image scores the same: no caption is retrieved
    assert recall_at_k(collapsed, collapsed, ks=(1, 4)) == {1: 0.0, 4: 1.0}


def test_training_and_eval_report_the_same_recall():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    image = torch.nn.functional.normalize(text + 0.8 * torch.randn(12, 8), dim=-1)
    image[3] = image[2]  # a tie on top of a random gallery
    text[3] = image[2]
    ours = recall_at_k(text, image, ks=(1, 5))
    trained = retrieval_metrics(text, image)
    assert trained["eval_retrieval_top1"] == ours[1] and trained["eval_retrieval_top5"] == ours[5]
    assert eval_recall(text, image, ks=(1, 5)) == {"recall@1": ours[1], "recall@5": ours[5]}
    assert trained["eval_gallery"] == 12 and trained["eval_chance_top1"] == pytest.approx(1 / 12)
