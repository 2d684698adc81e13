"""Conversations -> token ids with a loss mask, through one chat template that training and serving share.

Every row, whatever its format, becomes either a conversation (a list of ``{"role", "content"}``
messages, roles ``system`` / ``user`` / ``assistant``) or a raw text. A conversation is rendered with
a Jinja chat template: the tokenizer's own one when it has one (``template=auto`` or ``tokenizer``), or
a named one (``chatml``, ``alpaca``). The exact template text is stored in the :class:`Rendering`, which
is saved as ``rendering.json`` beside the adapter, so generation later builds prompts byte for byte as
training did, even if the tokenizer files change.

Loss mask: by default only assistant turns are trained, each up to and including the EOS token that
closes it, so the model learns to stop. Everything else (system, user, template headers, anything the
template adds after the final EOS) has label ``-100``. ``train_on_inputs=True`` trains every token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lit_lora.errors import UserError

IGNORE_INDEX = -100
RENDERING_FILE = "rendering.json"
TEMPLATES = ("auto", "tokenizer", "chatml", "alpaca")

# Named templates for tokenizers without one. Assistant turns end with the tokenizer's EOS so that
# the trained answer closes with the token generation stops at.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "{% if m['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
}


class TemplateMismatch(UserError):
    """The chat template renders an earlier turn of one conversation differently once later turns follow,
    so that turn's answer cannot be located; :func:`lit_lora.data.module.encode_rows` makes it a bad row."""


@dataclass
class Rendering:
    """How a conversation becomes tokens; saved as ``rendering.json`` beside the adapter.

    ``chat_template`` is the exact Jinja text used (resolved from ``template``); ``system_prompt``
    is prepended to conversations that carry no system message of their own.
    """

    template: str = "tokenizer"
    chat_template: str | None = None
    system_prompt: str | None = None
    train_on_inputs: bool = False
    format: str = "alpaca"
    fields: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, tokenizer, template: str = "auto", **kwargs) -> Rendering:
        """A rendering for ``tokenizer``: ``auto`` takes its own chat template, else ``chatml``."""
        if template not in TEMPLATES:
            raise UserError(f"data.template={template!r} is not one of {', '.join(TEMPLATES)}")
        own = getattr(tokenizer, "chat_template", None)
        if template == "tokenizer" and not own:
            raise UserError(
                "data.template=tokenizer but this tokenizer has no chat template; use chatml or alpaca"
            )
        if template == "auto":
            template = "tokenizer" if own else "chatml"
        text = own if template == "tokenizer" else NAMED_TEMPLATES[template]
        if not isinstance(text, str):  # a dict of named templates (a few hub tokenizers): take the default
            text = text["default"]
        return cls(template=template, chat_template=text, **kwargs)

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def save(self, folder: Path) -> None:
        (folder / RENDERING_FILE).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> Rendering:
        return cls(**json.loads((Path(folder) / RENDERING_FILE).read_text()))


def _ids(
    tokenizer, rendering: Rendering, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=rendering.chat_template,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
    )
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_ids(tokenizer, rendering: Rendering, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt a model answers: ``messages`` (no final answer) and the assistant header."""
    return _ids(tokenizer, rendering, rendering.with_system(messages), add_generation_prompt=True)


def prompt_text(tokenizer, rendering: Rendering, messages: list[dict[str, str]]) -> str:
    """The prompt of :func:`prompt_ids` as text (for runtimes that tokenize themselves: llama.cpp, Ollama)."""
    return tokenizer.apply_chat_template(
        rendering.with_system(messages),
        chat_template=rendering.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_conversation(
    tokenizer, rendering: Rendering, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a whole conversation, untruncated.

    Each assistant turn is located by rendering the conversation up to it twice, with the generation
    prompt and with the answer: tokens past their common prefix, up to and including the first EOS,
    are that turn's answer. Tokens after the last trained EOS (SmolLM2's trailing newline) are cut so
    that every sequence ends where generation stops. A template that closes an answer without EOS
    gets one appended to the final answer.
    """
    messages = rendering.with_system(messages)
    eos = tokenizer.eos_token_id
    full = _ids(tokenizer, rendering, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, rendering, messages[:i], add_generation_prompt=True)
        upto = _ids(tokenizer, rendering, messages[: i + 1], add_generation_prompt=False)
        start = _common_prefix(before, upto)
        end = next((j + 1 for j in range(start, len(upto)) if upto[j] == eos), len(upto))
        # Tokens after the answer's EOS may merge differently once more text follows; up to it they must not.
        if full[:end] != upto[:end]:
            raise TemplateMismatch(
                "the chat template renders an earlier turn differently once later turns follow; "
                "choose data.template=chatml or alpaca"
            )
        spans.append((start, end))
    if spans:
        start, end = spans[-1]
        full = full[:end]
        if full[-1] != eos:  # no EOS after the final answer: the model must still learn to stop
            full.append(eos)
            spans[-1] = (start, end + 1)
    if rendering.train_on_inputs:
        return full, list(full)
    labels = [IGNORE_INDEX] * len(full)
    for start, end in spans:
        labels[start:end] = full[start:end]
    return full, labels


def prompt_turns(messages: list[dict[str, str]]) -> int:
    """How many opening turns of a preference conversation are its prompt: up to the last turn that is
    not the assistant's (the answer of a preference pair is assistant turns only)."""
    return max(i for i, m in enumerate(messages) if m["role"] != "assistant") + 1


def encode_answer(
    tokenizer, rendering: Rendering, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one side of a preference pair: only the final answer (the assistant
    turns after :func:`prompt_turns`) is labelled; earlier assistant turns of the prompt are context.

    The prompt's tokens are those the prompt renders to with the generation prompt, as in
    :func:`prompt_ids`, so chosen and rejected of a pair share them exactly.
    """
    ids, labels = encode_conversation(tokenizer, rendering, messages)
    start = _common_prefix(prompt_ids(tokenizer, rendering, messages[: prompt_turns(messages)]), ids)
    return ids, [IGNORE_INDEX] * start + labels[start:]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of raw text for continued pre-training: every token and a closing EOS trained."""
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return ids, list(ids)


def count_trained(labels: list[int]) -> int:
    """Trained positions of a sequence. Position 0 is never predicted, so its label does not count."""
    return sum(label != IGNORE_INDEX for label in labels[1:])
