"""An Ollama ``Modelfile`` beside a GGUF export: ``FROM``, ``ADAPTER``, the chat template as a Go
``TEMPLATE``, its ``PARAMETER stop`` tokens and the default system prompt.

A Jinja chat template cannot be translated in general. lit-lora knows two families (ChatML and
Llama 3 headers); a template is translated only when the family's Go template, as Ollama fills it
(the ``SYSTEM`` default becomes the first message of a conversation that has none), produces exactly
the text training's template renders, checked on probe conversations. Anything else is reported with
:class:`UntranslatableTemplate`, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lit_lora.errors import UserError


class UntranslatableTemplate(UserError):
    """The chat template is not one lit-lora can write as an Ollama template (the reason is the message)."""


@dataclass(frozen=True)
class Family:
    """One chat-template family: its Go template, the tokens generation stops at, and a Python rendering
    of the Go template (what Ollama sends to the model) used to check the translation."""

    name: str
    markers: tuple[str, ...]
    go_template: str
    stops: tuple[str, ...]
    render: Callable[[list[dict]], str]
    system_block: str  # regex of a leading system turn, group 1 its text


def _chatml(messages: list[dict]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _llama3(messages: list[dict]) -> str:
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    )
    return "<|begin_of_text|>" + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


FAMILIES = (
    Family(
        "chatml",
        ("<|im_start|>", "<|im_end|>"),
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        _chatml,
        r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n",
    ),
    Family(
        "llama3",
        ("<|start_header_id|>", "<|eot_id|>"),
        # No <|begin_of_text|>: the tokenizer adds it (add_bos_token), as the rendering below shows.
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        _llama3,
        r"^<\|begin_of_text\|><\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
    ),
)
PROBE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


@dataclass
class Translation:
    """The Ollama form of a chat template."""

    family: str
    template: str
    stops: tuple[str, ...]
    system: str | None  # the default system prompt, if the rendering or the template has one


def translate(render: Callable[[list[dict]], str], system_prompt: str | None) -> Translation:
    """Translate training's template. ``render(messages)`` is training's own prompt text for a
    conversation (generation prompt added); ``system_prompt`` is the rendering's default, prepended by
    lit-lora to conversations without a system turn. Raises :class:`UntranslatableTemplate`."""
    plain = render(PROBE)
    for family in FAMILIES:
        if not all(marker in plain for marker in family.markers):
            continue
        system = system_prompt
        if system is None and family.render(PROBE) != plain:
            # The template may add its own default system turn (SmolLM2's does): take its text.
            found = re.match(family.system_block, plain, flags=re.S)
            system = found.group(1) if found else None
        with_system = [{"role": "system", "content": "You answer briefly."}, *PROBE]
        default = [{"role": "system", "content": system}] if system is not None else []
        if family.render([*default, *PROBE]) == plain and family.render(with_system) == render(with_system):
            return Translation(family.name, family.go_template, family.stops, system)
        raise UntranslatableTemplate(
            f"the chat template looks like {family.name} but renders differently from lit-lora's Ollama "
            "translation of it; export with modelfile=false and write the TEMPLATE by hand"
        )
    raise UntranslatableTemplate(
        f"the chat template is none of the families lit-lora translates for Ollama "
        f"({', '.join(f.name for f in FAMILIES)}); export with modelfile=false and write the TEMPLATE by hand"
    )


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UntranslatableTemplate('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile_text(model: Path | str, translation: Translation, adapter: Path | str | None = None) -> str:
    """The Modelfile: ``FROM model`` (a GGUF file), ``ADAPTER`` for a LoRA GGUF, the template, its stop
    tokens and the default system prompt."""
    lines = [f"FROM {model}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f"TEMPLATE {_quoted(translation.template)}")
    if translation.system is not None:
        lines.append(f"SYSTEM {_quoted(translation.system)}")
    lines += [f'PARAMETER stop "{stop}"' for stop in translation.stops]
    return "\n".join(lines) + "\n"
