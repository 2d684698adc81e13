"""Rollouts: GRPO's completions, decoded by the weights being trained.

:class:`RolloutEngine` is the one interface the objective talks to: prompts in (token ids), ``G``
completions per prompt out (token ids, and whether each was cut at the length limit). The engine here,
:class:`LocalRollouts`, decodes with :func:`lit_lora.inference.decoding.decode_loop` on the training
model itself: the adapter on, dropout off (:func:`~lit_lora.inference.decoding.eval_mode`), no copy of
the weights, no merge, nothing to synchronise after an optimizer step. Each prompt is prefilled once and
its key/value cache shared by its ``G`` rows; each row draws from its own generator, seeded from
``(seed, step, prompt, g)``, so a resumed run draws the same completions as an uninterrupted one and a
row's tokens do not depend on which other rows share the batch (beyond float round-off of padding).

Another engine (vLLM on CUDA) implements :meth:`RolloutEngine.rollout` the same way and needs no change
in the objective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lit_lora.inference.decoding import Sampler, Sampling, decode_loop, eval_mode


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its new tokens (EOS included when it ended on one) and whether it was cut at
    ``max_new_tokens`` without an EOS."""

    tokens: list[int]
    truncated: bool


class RolloutEngine(Protocol):
    """What GRPO needs from a decoder."""

    def rollout(
        self, model, prompts: Sequence[Sequence[int]], num_generations: int, seeds: Sequence[int]
    ) -> list[Completion]:
        """``num_generations`` completions of each prompt (``len(prompts) * num_generations``, a prompt's
        adjacent, in prompt order), sampled by ``model``; ``seeds[i]`` seeds prompt ``i``'s group."""
        ...


def row_seed(seed: int, g: int) -> int:
    """The seed of completion ``g`` of a group seeded ``seed``: a hash, so that nearby seeds and rows
    give unrelated streams (torch's generator is a Mersenne twister seeded by one 64-bit value)."""
    digest = hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def group_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """The seed of the group of prompt ``prompt_index`` (its index in the training split) at round
    ``step``: the same prompt in another round draws other completions; a resumed run the same ones."""
    return row_seed(run_seed, step * 1_000_003 + prompt_index)


class LocalRollouts:
    """:class:`RolloutEngine` on the training model (see the module docstring). ``batch_size`` bounds
    the prompts decoded together (each with its ``G`` rows); ``eos_id`` ends a completion."""

    def __init__(
        self,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        pad_id: int | None,
        eos_id: int | None,
        batch_size: int = 64,
    ):
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size

    def rollout(
        self, model, prompts: Sequence[Sequence[int]], num_generations: int, seeds: Sequence[int]
    ) -> list[Completion]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        out: list[Completion] = []
        with eval_mode(model):
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                samplers = [
                    Sampler(Sampling(self.temperature, self.top_p, row_seed(seed, g)))
                    for seed in seeds[start : start + self.batch_size]
                    for g in range(num_generations)
                ]
                tokens = decode_loop(
                    model,
                    chunk,
                    samplers,
                    max_new_tokens=self.max_new_tokens,
                    pad_id=self.pad_id,
                    eos_id=self.eos_id,
                    repeats=num_generations,
                )
                out += [Completion(t, self._truncated(t)) for t in tokens]
        return out

    def _truncated(self, tokens: list[int]) -> bool:
        return len(tokens) >= self.max_new_tokens and (self.eos_id is None or tokens[-1] != self.eos_id)
