"""The exported tokenizer carries the run's chat template and context length, and the export loads
cleanly: AutoTokenizer without prompts, no bogus model-type warning, transformers.pipeline works."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from mks2.data.chat import chat_pieces
from mks2.data.encode import encode_pieces
from mks2.data.tokenizer import SentencePieceTokenizer
from mks2.demo.tokenizer import train_sentencepiece
from mks2.export import export_model
from tests.export.export_helpers import run_config, tiny_model

CONVERSATIONS = [
    # (system or None, [(user, answer or None), ...]); None answer = a generation prompt
    (None, [("what colour is the cube?", None)]),
    (None, [("what colour is the cube?", "it is red"), ("and the ball?", "blue, and small")]),
    ("you answer briefly", [("name the shape", "a pyramid"), ("how many?", None)]),
    ("you answer briefly", [("  spaces around  ", " padded answer ")]),
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    text = ["what colour is the red cube and the blue ball", "name the shape: a small green pyramid",
            "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> how many? you answer briefly"] * 40  # fmt: skip
    (d / "sp.model").write_bytes(train_sentencepiece(text, vocab_size=400, pad_id=3))
    return d / "sp.model"


@pytest.fixture(scope="module", params=["llama2", "vicuna_v1"])
def export_dir(request, tmp_path_factory, sp_model):
    cfg = run_config("model.stage=mome", f"data.tokenizer={sp_model}", "model.vocab_size=400",
                     f"data.chat_template={request.param}")  # fmt: skip
    out = tmp_path_factory.mktemp(request.param) / "export"
    export_model(tiny_model(cfg), cfg, out, verify=False, progress=False)
    return request.param, out


def _messages(system, turns):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in turns:
        msgs.append({"role": "user", "content": user})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


def test_apply_chat_template_equals_the_training_tokens(export_dir, sp_model):
    template, out = export_dir
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    training = SentencePieceTokenizer(sp_model)
    for system, turns in CONVERSATIONS:
        ids, _ = encode_pieces(training, chat_pieces(turns, template=template, system=system, image_token=None))
        got = tok.apply_chat_template(_messages(system, turns), tokenize=True, add_generation_prompt=True)
        got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        assert list(got) == ids.tolist(), (template, system, turns)
    assert tok.model_max_length == json.loads((out / "config.json").read_text())["max_position_embeddings"]


def test_chat_template_refuses_roles_out_of_order(export_dir):
    _, out = export_dir
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_loading_is_quiet_and_the_pipeline_generates(export_dir, capfd):
    _, out = export_dir
    transformers.logging.set_verbosity_warning()
    # AutoTokenizer reads config.json (auto_map: remote code) even for a standard tokenizer: without
    # trust_remote_code it would ask "[y/N]" and then warn about model type ``.
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    logs = capfd.readouterr()
    assert "to instantiate a model of type" not in logs.out + logs.err
    assert "[y/N]" not in logs.out + logs.err
    pipe = transformers.pipeline("text-generation", model=str(out), trust_remote_code=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "name the shape"}], tokenize=False)
    result = pipe(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert result[0]["generated_text"].startswith(prompt)
    ids = pipe.preprocess(prompt)["input_ids"]  # what the pipeline feeds the model
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    logs = capfd.readouterr()
    assert "to instantiate a model of type" not in logs.out + logs.err
    assert result[0]["generated_text"] == prompt + tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
