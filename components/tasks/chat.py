"""Chat templates: a prompt (plain text, an HH-RLHF transcript or chat messages) as the text a model
sees before its answer.

With `task.chat_template` the base model's tokenizer renders every prompt with its chat template
(the generation prompt included) and responses lose their surrounding whitespace; without it,
text stays as it is and messages are joined HH-style ("\\n\\nHuman: ...\\n\\nAssistant:").
"""

from __future__ import annotations

import re
from typing import Any, Callable

from components.data.rows import ASSISTANT, ROLES

Prompt = str | list[dict[str, str]]
_TURN = re.compile(r"\n\n(Human|Assistant|System):")
_SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}


def to_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages of a prompt: messages as they are, an HH transcript as alternating turns
    (without its empty final assistant turn), any other text as one user message."""
    if isinstance(prompt, list):
        return prompt
    if not prompt.startswith(("\n\nHuman:", "\n\nSystem:")):  # not an HH transcript
        return [{"role": "user", "content": prompt}]
    parts = _TURN.split(prompt)[1:]  # speaker, content, speaker, content, ...
    messages = [{"role": _SPEAKERS[s], "content": c.strip()} for s, c in zip(parts[::2], parts[1::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def to_hh(prompt: Prompt) -> str:
    """Text as it is; messages joined HH-style, ending with "\\n\\nAssistant:"."""
    if isinstance(prompt, str):
        return prompt
    turns = "".join(f"\n\n{ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)
    return turns + ASSISTANT


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt through the tokenizer's chat template, ending with the assistant's turn opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"task.chat_template: the tokenizer {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)


def clean_response(text: str, chat: bool) -> str:
    """A response as a chat model produces it (no surrounding whitespace), or as it is."""
    return text.strip() if chat else text


def load_tokenizer(pretrained: str):
    """Only the tokenizer of a model folder, `gguf:` or `package:` name, or hub id (online)."""
    from transformers import AutoTokenizer

    from components.models.lm import model_folder

    return AutoTokenizer.from_pretrained(model_folder(pretrained))


def renderer(cfg) -> Callable[[Prompt], str]:
    """Prompt -> model text for the pipeline configuration `cfg` (see the module docstring)."""
    if not cfg.task.chat_template:
        return to_hh
    if not cfg.base.pretrained:
        raise ValueError("task.chat_template needs base.pretrained: a model whose tokenizer has a chat template")
    tokenizer = load_tokenizer(cfg.base.pretrained)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"task.chat_template: the tokenizer of {cfg.base.pretrained!r} has no chat template")
    return lambda prompt: render_prompt(tokenizer, prompt)
