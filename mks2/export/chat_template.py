"""The training chat templates (``mks2.data.chat``) as Jinja templates for an exported tokenizer.

``tokenizer.apply_chat_template(messages)`` on an export renders the string whose tokens equal what
training fed the model for the same conversation (``mks2.data.chat.chat_pieces`` tokenised piece by
piece): BOS/EOS are the tokenizer's own special tokens and every text piece starts a new
sentencepiece word, as Llama tokenizers (``legacy``) do after a special token or a space. Messages
are ``{"role": "system" | "user" | "assistant", "content": str}``, an optional system message first,
then user and assistant alternating; the prompt already ends where the answer starts, so
``add_generation_prompt`` adds nothing. Images are not part of the text template: a multimodal
prompt is built with the package's pieces (``tools/chat.py`` does).
"""

from __future__ import annotations

from mks2.data.chat import TEMPLATES, VICUNA_SYSTEM

_SYSTEM_FIRST = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = DEFAULT_SYSTEM -%}{%- endif -%}"
)
_ALTERNATE = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('chat template: after an optional system message, roles must alternate user, "
    "assistant, user, ...') }}{%- endif -%}"
)

LLAMA2 = (
    _SYSTEM_FIRST.replace("DEFAULT_SYSTEM", "none")
    + "{%- for message in messages -%}"
    + _ALTERNATE
    + "{%- if message['role'] == 'user' -%}"
    "{%- set sys_block = ('<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n') if (loop.first and system) else '' -%}"
    "{{ bos_token + '[INST] ' + sys_block + (message['content'] | trim) + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + (message['content'] | trim) + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
"""Llama-2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s><s>[INST] ...``."""

VICUNA_V1 = (
    _SYSTEM_FIRST.replace("DEFAULT_SYSTEM", repr(VICUNA_SYSTEM))
    + "{{ bos_token }}"
    + "{%- for message in messages -%}"
    + _ALTERNATE
    + "{%- if message['role'] == 'user' -%}"
    "{{ ((system + ' ') if (loop.first and system) else '') + 'USER: ' + message['content'] + ' ASSISTANT:' }}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)
"""Vicuna v1: ``<s>{system} USER: {user} ASSISTANT: {answer}</s>USER: ...``."""

JINJA_TEMPLATES = {"llama2": LLAMA2, "vicuna_v1": VICUNA_V1}
assert set(JINJA_TEMPLATES) == set(TEMPLATES)


def jinja_chat_template(template: str) -> str:
    """The Jinja form of training chat template ``template`` (``data.chat_template``)."""
    template = getattr(template, "value", template)
    if template not in JINJA_TEMPLATES:
        raise ValueError(f"data.chat_template: unknown template {template!r} (allowed: {', '.join(TEMPLATES)})")
    return JINJA_TEMPLATES[template]


def template_name(jinja: str | None) -> str | None:
    """The training template an exported tokenizer's ``chat_template`` is (None: not one of ours)."""
    return next((name for name, text in JINJA_TEMPLATES.items() if text == jinja), None)
