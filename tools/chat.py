#!/usr/bin/env python
"""Chat with an MKS2 model (an HF export or a training checkpoint), streaming the answer as it is generated.

    python tools/chat.py hf/demo_stage2                                  # interactive; empty line or Ctrl-D quits
    python tools/chat.py runs/demo_stage2 --prompt "what is left of the red cube?"        # one answer, then exit
    python tools/chat.py hf/demo_stage1 --image scene.png --prompt "describe the picture"
    python tools/chat.py hf/mks2-7b --temperature 0 --max-new-tokens 128                  # greedy

MODEL is what ``tools/evaluate.py`` takes: a ``train.save_dir`` (newest complete checkpoint, or ``--tag``),
a ``step_XXXXXXXX`` directory, or an export directory (config.json). Prompts use the run's chat template
(an export's is recognised from its tokenizer; ``--chat-template`` overrides), built with the same pieces
as training, so ``--image`` puts the image prefix where the ``<image>`` placeholder is (before the first
question when the question has none). Generation runs with a key/value cache; the image is encoded once.
Sampling: ``--temperature`` (default 0.2, 0 = greedy), ``--top-p`` (0.9), ``--max-new-tokens`` (256),
``--seed``. Conversations keep their earlier turns. Exit status 1 on a bad model, image or argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a chat starts, so --help answers at once
    import torch

IMAGE_TOKEN = "<image>"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="training save_dir / step directory, or HF export directory")
    p.add_argument("--tag", default=None, help="checkpoint tag in a save_dir (default: newest complete)")
    p.add_argument("--prompt", default=None, help="answer this one question and exit (default: interactive)")
    p.add_argument("--image", default=None, help="an image file for the (first) question")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--chat-template", default="auto", help="llama2, vicuna_v1 or auto (the run's / the export's)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's, or the export directory)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code an HF directory ships (see evaluate)")
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        p.error("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    return args


def export_template(directory: Path) -> str | None:
    """The training template of an export's tokenizer (tokenizer_config.json's chat_template)."""
    from mks2.export.chat_template import template_name

    config = directory / "tokenizer_config.json"
    return template_name(json.loads(config.read_text()).get("chat_template")) if config.is_file() else None


class Chat:
    """One conversation: history of (question, answer) turns, the image of the first turn."""

    def __init__(self, em: Any, args: argparse.Namespace):
        self.em, self.args = em, args
        self.core = getattr(em.model, "core", em.model)  # an export's wrapper runs our model underneath
        import torch

        self.history: list[tuple[str, str]] = []
        self.pixel_values = None
        self.generator = torch.Generator().manual_seed(args.seed)
        if args.image:
            self.pixel_values = self._load_image(args.image)

    def _load_image(self, path: str) -> torch.Tensor:
        from PIL import Image

        vision = getattr(self.core, "vision", None)
        if vision is None:
            raise ValueError(f"--image: this model has no vision front-end ({self.em.source})")
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise ValueError(f"--image: cannot read {path}: {exc}") from exc
        return vision.image_processor()(images=image, return_tensors="pt")["pixel_values"]  # [1, 3, H, W]

    def prompt_ids(self, question: str) -> list[int]:
        from mks2.data.chat import prompt_pieces
        from mks2.data.encode import encode_pieces

        if self.pixel_values is not None and not self.history and IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n{question}"
        pieces = prompt_pieces(self.history, question, template=self.em.chat_template, system=self.args.system,
                               image_token=IMAGE_TOKEN if self.pixel_values is not None else None)  # fmt: skip
        image_id = int(self.core.image_token_id) if hasattr(self.core, "image_token_id") else -200
        ids, _ = encode_pieces(self.em.tokenizer, pieces, image_token_id=image_id)
        out: list[int] = []
        prefix = self.core.vision.num_prefix_tokens if self.pixel_values is not None else 0
        for i in ids.tolist():  # one placeholder per image -> the vision prefix length, as the collator does
            out += [i] * prefix if i == image_id else [i]
        return out

    def _next_logits(self, ids: torch.Tensor, cache: Any, first: bool) -> torch.Tensor:
        import torch

        mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
        if hasattr(self.core, "routers"):  # our model (training checkpoint or an export's core)
            pixels = self.pixel_values if first and self.pixel_values is not None and not self.history else None
            out = self.core(ids, attention_mask=mask, past_key_values=cache, pixel_values=pixels, logits_to_keep=1)
        else:  # a plain LlamaForCausalLM export
            out = self.em.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()  # [V]

    def _sample(self, logits: torch.Tensor) -> int:
        import torch

        if self.args.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.args.temperature, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < self.args.top_p  # the smallest set reaching top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])

    def answer(self, question: str) -> str:
        import torch

        with torch.no_grad():
            return self._answer(question)

    def _answer(self, question: str) -> str:
        import torch
        from transformers import DynamicCache, TextStreamer

        streamer = TextStreamer(self.em.tokenizer)  # prints decoded words as they complete
        cache = DynamicCache()
        ids = torch.tensor([self.prompt_ids(question)])
        eos = self.em.tokenizer.eos_id
        generated: list[int] = []
        for step in range(self.args.max_new_tokens):
            token = self._sample(self._next_logits(ids, cache, first=step == 0))
            if token == eos:
                break
            generated.append(token)
            streamer.put(torch.tensor([token]))
            ids = torch.tensor([[token]])
        streamer.end()
        text = self.em.tokenizer.decode(generated)
        self.history.append((question, text))
        return text


def _quiet_deepspeed_accelerator() -> None:
    """Reading a training checkpoint imports DeepSpeed, whose accelerator detection announces a CPU fallback
    on stdout: the stream the answer goes to. Name the accelerator for it when there is no GPU."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    _quiet_deepspeed_accelerator()
    from mks2.errors import UserError
    from mks2.eval.checkpoints import load_for_eval

    try:
        template = None if args.chat_template == "auto" else args.chat_template
        em = load_for_eval(args.model, tag=args.tag, tokenizer=args.tokenizer, chat_template=template or "auto",
                           trust_remote_code=args.trust_remote_code)  # fmt: skip
        if template is None and (Path(args.model) / "config.json").is_file():
            em.chat_template = export_template(Path(args.model)) or em.chat_template
        if em.chat_template not in ("llama2", "vicuna_v1"):
            raise ValueError(f"--chat-template: {em.chat_template!r} is not llama2 or vicuna_v1")
        chat = Chat(em, args)
    except (UserError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    if args.prompt is not None:
        chat.answer(args.prompt)
        return 0
    print(f"{em.source} ({em.chat_template} template); an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            question = input("USER: ").strip()
        except EOFError:
            return 0
        if not question:
            return 0
        print("ASSISTANT: ", end="", flush=True)
        chat.answer(question)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
