"""Try a model: ``lit-lora generate adapter=<folder> prompt="..."`` (no prompt: interactive chat).

The prompt is built with exactly the rendering saved with the adapter (or a merged folder's
``rendering.json``), tokens are streamed as they are produced, and generation stops at EOS.
``temperature=0`` (default) is greedy and deterministic; ``temperature`` > 0 samples with ``top_p`` from a
generator seeded with ``seed``: the same answer as ``lit_lora.serve`` gives a request with the same
``temperature``, ``top_p`` and ``seed`` (both decode with :mod:`lit_lora.inference.decoding`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lit_lora.config.apps import GenerateConfig, typed
from lit_lora.config.compose import compose
from lit_lora.data.rendering import prompt_ids
from lit_lora.errors import UserError
from lit_lora.inference.decoding import IncrementalDetokenizer, Sampling, generate_tokens
from lit_lora.models.adapters import rendering_for, tokenizer_for
from lit_lora.models.builder import build_model


@dataclass
class Reply:
    text: str
    new_tokens: int
    stopped_at_eos: bool


class Session:
    """A loaded model, its tokenizer and rendering; :meth:`reply` answers a conversation."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        folder = Path(cfg.adapter).expanduser() if cfg.adapter else None
        built = build_model(cfg, adapter=folder)
        self.model = built.model
        self.tokenizer = tokenizer_for(folder, built.tokenizer) if folder else built.tokenizer
        self.rendering = rendering_for(folder or Path(built.source), self.tokenizer)
        if cfg.system_prompt is not None:
            self.rendering.system_prompt = cfg.system_prompt

    def reply(
        self, messages: list[dict[str, str]], stream: bool | Callable[[str], None] | None = None
    ) -> Reply:
        """The model's answer to ``messages``. ``stream``: true prints the text to stdout as it is
        produced (then a newline); a callable gets each piece of text instead."""
        prompt = prompt_ids(self.tokenizer, self.rendering, messages)
        show = stream if callable(stream) else (_print_piece if stream else None)
        on_token = None
        if show is not None:
            text = IncrementalDetokenizer.for_tokenizer(self.tokenizer)

            def on_token(row: int, token: int) -> None:
                piece = text.push(token)
                if piece:
                    show(piece)

        [new] = generate_tokens(
            self.model,
            [prompt],
            max_new_tokens=self.cfg.max_new_tokens,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id,
            sampling=Sampling(self.cfg.temperature, self.cfg.top_p, self.cfg.seed),
            on_token=on_token,
        )
        if show is not None:
            rest = text.flush()
            if rest:
                show(rest)
            if show is _print_piece:
                print(flush=True)
        return Reply(
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            new_tokens=len(new),
            stopped_at_eos=bool(new) and new[-1] == self.tokenizer.eos_token_id,
        )


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def _say_end(reply: Reply, limit: int) -> None:
    end = "EOS" if reply.stopped_at_eos else f"max_new_tokens={limit}"
    print(f"\nlit-lora: [{reply.new_tokens} tokens, stopped at {end}]", file=sys.stderr, flush=True)


def chat(cfg: GenerateConfig) -> Reply | None:
    """The command: answer ``prompt`` (streamed), or, without one, an interactive chat on stdin."""
    session = Session(cfg)
    if cfg.prompt is not None:
        reply = session.reply([{"role": "user", "content": cfg.prompt}], stream=cfg.stream)
        if not cfg.stream:
            print(reply.text, flush=True)
        _say_end(reply, cfg.max_new_tokens)
        return reply
    print("lit-lora: chat; an empty line or Ctrl-D ends it", file=sys.stderr, flush=True)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        reply = session.reply(messages, stream=True)
        messages.append({"role": "assistant", "content": reply.text})
        _say_end(reply, cfg.max_new_tokens)
    return None


def run(overrides: Sequence[str] = ()) -> Reply:
    """``lit-lora generate prompt=... <overrides>`` as a function (:mod:`lit_lora.config.compose`): the
    reply to ``prompt``, not streamed. Raises :class:`~lit_lora.errors.UserError` for user mistakes."""
    cfg = typed(compose("generate", overrides), GenerateConfig)
    if cfg.prompt is None:
        raise UserError("generate.run needs prompt=...; the interactive chat is the command line's")
    return Session(cfg).reply([{"role": "user", "content": cfg.prompt}], stream=False)


def task(cfg: DictConfig) -> None:
    """``lit-lora generate``'s job on the composed config (:mod:`lit_lora.cli`)."""
    chat(typed(cfg, GenerateConfig))
