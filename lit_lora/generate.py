"""Try a model: ``python -m lit_lora.generate adapter=<folder> prompt="..."`` (no prompt: interactive chat).

The prompt is built with exactly the rendering saved with the adapter (or a merged folder's
``rendering.json``), tokens are streamed as they are produced, and generation stops at EOS.
``temperature=0`` (default) is greedy and deterministic; ``temperature`` > 0 samples with ``top_p``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lit_lora.adapters import rendering_for, tokenizer_for
from lit_lora.api import compose
from lit_lora.app_config import GenerateConfig, app_main, typed
from lit_lora.builder import build_model
from lit_lora.errors import UserError
from lit_lora.rendering import prompt_ids


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

    @torch.no_grad()
    def reply(self, messages: list[dict[str, str]], stream=None) -> Reply:
        from transformers import TextStreamer

        ids = torch.tensor([prompt_ids(self.tokenizer, self.rendering, messages)])
        sampling = self.cfg.temperature > 0
        if sampling:
            torch.manual_seed(self.cfg.seed)
        streamer = (
            TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        )
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=sampling,
            temperature=self.cfg.temperature if sampling else None,
            top_p=self.cfg.top_p if sampling else None,
            top_k=None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
        )
        new = out[0, ids.shape[1] :].tolist()
        return Reply(
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            new_tokens=len(new),
            stopped_at_eos=bool(new) and new[-1] == self.tokenizer.eos_token_id,
        )


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
    """``python -m lit_lora.generate prompt=... <overrides>`` as a function (:mod:`lit_lora.api`): the
    reply to ``prompt``, not streamed. Raises :class:`~lit_lora.errors.UserError` for user mistakes."""
    cfg = typed(compose("generate", overrides), GenerateConfig)
    if cfg.prompt is None:
        raise UserError("generate.run needs prompt=...; the interactive chat is the command line's")
    return Session(cfg).reply([{"role": "user", "content": cfg.prompt}], stream=False)


main = app_main(chat, GenerateConfig, "generate")


if __name__ == "__main__":
    main()
