"""tools/chat.py --prompt on an export: streams the greedy answer to the run's chat-template prompt,
with and without an image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from mks2.data.tokenizer import load_tokenizer
from mks2.demo.tokenizer import train_sentencepiece
from mks2.export import export_model
from tests.export.export_helpers import run_config, tiny_model
from tests.fixtures import make_tiny_clip
from tests.launching import python

NEW = 6


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    text = ["the red cube sits left of a blue ball", "what is in the picture? a small green pyramid"] * 40
    (d / "sp.model").write_bytes(train_sentencepiece(text, vocab_size=300, pad_id=3))
    make_tiny_clip(d / "clip")
    cfg = run_config("model.stage=mome", f"data.tokenizer={d / 'sp.model'}", "model.vocab_size=300",
                     "data.chat_template=vicuna_v1", vision_dir=d / "clip")  # fmt: skip
    export_model(tiny_model(cfg), cfg, d / "export", verify=False, progress=False)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(d / "red.png")
    return d


def _chat(export_dir, *extra):
    run = python("tools/chat.py", str(export_dir / "export"), "--prompt", "what is in the picture?",
                 "--temperature", "0", "--max-new-tokens", str(NEW), *extra)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@torch.no_grad()
def test_chat_prompt_streams_the_greedy_answer(export_dir):
    out = export_dir / "export"
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    msgs = [{"role": "user", "content": "what is in the picture?"}]
    ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]])
    expected = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1] :]
    expected = expected[expected != tok.eos_token_id]
    # chat.py decodes with the package's tokenizer (sentencepiece here), as training did
    assert _chat(export_dir).strip() == load_tokenizer(out).decode(expected.tolist()).strip()


def test_chat_with_an_image_and_bad_image(export_dir):
    assert _chat(export_dir, "--image", str(export_dir / "red.png")).strip()  # the image prefix fits the model
    run = python("tools/chat.py", str(export_dir / "export"), "--prompt", "hi", "--image", str(export_dir / "nope.png"))
    assert run.returncode == 1 and "--image: cannot read" in run.stderr and "Traceback" not in run.stderr
