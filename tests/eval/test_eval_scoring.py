"""The evaluator on fixtures with known answers: a bigram 'model' whose log-likelihoods are set by hand,
a word-level tokenizer, and JSONL files written by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mks2.eval import EvalModel, evaluate_mc, evaluate_open, recall_at_k, run_evaluation
from mks2.eval.data import EvalDataError, answer_ids, prompt_ids, read_mc, read_open

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "q1", "q2", "q3", "q4", "red", "blue", "a", "big", "dog", "cat", "say"]
ID = {w: i for i, w in enumerate(WORDS)}
V = len(WORDS)


class WordTokenizer:
    """Whitespace tokenizer over WORDS (the Tokenizer interface the evaluator uses)."""

    bos_id, eos_id, pad_id = 1, 2, 3

    def encode_batch(self, texts):
        return [[ID.get(w, 0) for w in t.split()] for t in texts]

    def decode(self, ids):
        return " ".join(WORDS[i] for i in ids)


class Bigram(nn.Module):
    """logits[b, t] = log P(next | token t) from a [V, V] probability table (rows sum to 1)."""

    def __init__(self, probs: dict[str, dict[str, float]]):
        super().__init__()
        table = torch.full((V, V), 1e-6)
        for prev, row in probs.items():
            for nxt, p in row.items():
                table[ID[prev], ID[nxt]] = p
        self.register_buffer("logp", (table / table.sum(1, keepdim=True)).log())

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.logp[input_ids]})()


def make_em(probs) -> EvalModel:
    return EvalModel(model=Bigram(probs), tokenizer=WordTokenizer(), chat_template=None, kind="hf", source="bigram")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROBS = {
    # q1 -> red (right), q2 -> red (wrong: answer is blue), q3: red and blue equally likely (a tie: a miss)
    "q1": {"red": 0.7, "blue": 0.2, "</s>": 0.1},
    "q2": {"red": 0.6, "blue": 0.3, "</s>": 0.1},
    "q3": {"red": 0.4, "blue": 0.4, "</s>": 0.2},
    "red": {"</s>": 1.0},
    "blue": {"</s>": 1.0},
    # q4: 'cat' wins on the summed log-likelihood, 'a big dog' on the per-token mean
    "q4": {"a": 0.3, "cat": 0.1, "</s>": 0.6},
    "a": {"big": 0.99},
    "big": {"dog": 0.99},
    "dog": {"</s>": 0.99},
    "cat": {"</s>": 0.01, "say": 0.99},
    "say": {"</s>": 1.0},
}

MC = [
    {"question": "q1", "choices": ["red", "blue"], "answer": 0, "kind": "colour"},
    {"question": "q2", "choices": ["red", "blue"], "answer": 1, "kind": "colour"},
    {"question": "q3", "choices": ["red", "blue"], "answer": 0, "kind": "colour"},
    {"question": "q4", "choices": ["a big dog", "cat"], "answer": 0, "kind": "long"},
]


def test_prompt_and_answer_tokens():
    tok = WordTokenizer()
    assert prompt_ids(tok, "q1", None) == [1, ID["q1"]]
    assert answer_ids(tok, "a big dog") == [ID["a"], ID["big"], ID["dog"], 2]
    assert answer_ids(tok, "red", eos=False) == [ID["red"]]


def test_multiple_choice_accuracy_on_known_log_likelihoods(tmp_path):
    items = read_mc(write_jsonl(tmp_path / "mc.jsonl", MC))
    res = evaluate_mc(make_em(PROBS), items, batch_size=3)
    # sums: q1 red (right); q2 red (wrong); q3 tie (miss); q4: log(.3*.99^3)=-1.23 vs log(.1*.01)=-6.9 -> dog
    assert [p["pred"] for p in res["predictions"]] == [0, 0, None, 0]
    assert res["acc"] == pytest.approx(2 / 4)
    assert res["by_kind"]["colour"] == {"n": 3, "acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3),
                                        "chance": pytest.approx(0.5)}  # fmt: skip
    expected_q1_red = math.log(0.7 / (0.7 + 0.2 + 0.1 + 1e-6 * (V - 3))) + math.log(1 / (1 + 1e-6 * (V - 1)))
    assert res["predictions"][0]["scores"][0] == pytest.approx(expected_q1_red, abs=1e-4)
    assert res["chance"] == pytest.approx(0.5)


def test_length_normalisation_changes_the_pick(tmp_path):
    # 'a big dog' sums to log(.25) + 3 log(.99) = -1.42 (mean -0.35); 'cat' to log(.35) + log(.99) = -1.06
    # (mean -0.53): the sum picks 'cat', the per-token mean picks 'a big dog'
    probs = dict(PROBS, q4={"a": 0.25, "cat": 0.35, "</s>": 0.4}, cat={"</s>": 0.99, "say": 0.01})
    items = read_mc(write_jsonl(tmp_path / "mc.jsonl", [MC[3]]))
    res = evaluate_mc(make_em(probs), items)
    s_dog, s_cat = res["predictions"][0]["scores"]
    assert s_cat > s_dog and s_dog / 4 > s_cat / 2  # sum picks cat, mean per token picks the dog
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_greedy_generation_and_open_metrics(tmp_path):
    rows = [
        {"question": "q1", "answer": "red"},  # greedy: red </s>
        {"question": "q4", "answer": "a big dog", "keywords": ["dog"]},  # greedy: </s> immediately -> ""
        {"question": "q2", "answer": "blue", "kind": "x"},  # greedy: red -> wrong
    ]
    items = read_open(write_jsonl(tmp_path / "open.jsonl", rows))
    res = evaluate_open(make_em(PROBS), items, max_new_tokens=5)
    assert [o["output"] for o in res["outputs"]] == ["red", "", "red"]
    assert res["exact"] == pytest.approx(1 / 3) and res["keyword"] == pytest.approx(1 / 3)
    assert res["by_kind"]["x"]["exact"] == 0.0


def test_generation_stops_at_max_new_tokens(tmp_path):
    probs = dict(PROBS, q1={"say": 1.0}, say={"say": 1.0})
    items = read_open(write_jsonl(tmp_path / "open.jsonl", [{"question": "q1", "answer": "say"}]))
    res = evaluate_open(make_em(probs), items, max_new_tokens=3)
    assert res["outputs"][0]["output"] == "say say say"


def test_recall_at_k_counts_ties_as_misses():
    text = torch.eye(3)
    image = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # caption 1 <-> image 2 swapped
    assert recall_at_k(text, image, ks=(1, 3)) == {"recall@1": pytest.approx(1 / 3), "recall@3": pytest.approx(1.0)}
    same = torch.ones(2, 4) / 2
    assert recall_at_k(same, same, ks=(1,))["recall@1"] == 0.0


def test_report_runs_every_file(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    op = write_jsonl(tmp_path / "op.jsonl", [{"question": "q1", "answer": "red"}])
    report = run_evaluation(make_em(PROBS), mc=[str(mc)], open_questions=[str(op)], limit=2)
    assert report["multiple_choice"]["mc"]["n"] == 2 and report["multiple_choice"]["mc"]["acc"] == 0.5
    assert report["open"]["op"]["exact"] == 1.0
    json.dumps(report)  # serialisable
    with pytest.raises(ValueError, match="no MoME router"):
        run_evaluation(make_em(PROBS), mc=[str(mc)], force_gates=[1.0, 0.0])


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "mc.jsonl:2: invalid JSON"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index into the 2 choices"),
        ('{"question": "", "choices": ["a", "b"], "answer": 0}', "'question' must be a non-empty string"),
        ('["q"]', "expected a JSON object"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + line + "\n")
    with pytest.raises(EvalDataError, match=message.replace("[", r"\[")) as info:
        read_mc(path)
    assert "mc.jsonl:2" in str(info.value)
