"""Decoding: the one module of lit-lora that turns a model's logits into new tokens, and new tokens into text.

Every other place that answers a prompt goes through here: held-out scoring and ``evaluate``
(:func:`lit_lora.inference.scoring.generate_answers`), ``generate`` (:class:`lit_lora.apps.generate.Session`),
the retention probe (``callbacks/retention.py``), the export gate (through scoring) and ``serve``'s engine
(:mod:`lit_lora.serve.engine`, which keeps its continuous batching but takes its model inputs, its
next-token choice and its streaming text from here). So ``generate`` and ``serve`` answer the same
request (prompt, temperature, top_p, seed) with the same tokens.

- :func:`generate_tokens`: greedy or sampled answers to one or many prompts, adapter on or off.
  Greedy runs transformers' ``model.generate`` (the answers every score was computed with);
  sampling runs :func:`decode_loop`, the key/value-cache loop whose forwards are the ones the serve
  engine makes (:func:`prefill_inputs`, :func:`step_inputs`).
- :class:`Sampling` / :class:`Sampler` / :func:`choose_next`: the next-token rule. Sampling is
  transformers' logits processors (:func:`logits_processors`: temperature, then top-p) and then
  :func:`draw`, from a generator of the request's own, seeded with its ``seed``.
- :class:`IncrementalDetokenizer`: streaming text at a cost bounded by the new tokens, not the answer.
- :func:`eval_mode` and :func:`adapter_enabled`: what every decoding (and scoring) caller wraps its
  forwards in, so that the model's train/eval flags and its adapter come back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from lit_lora.data.batching import left_padded

# The text tokenizers put where bytes do not (yet) form a whole UTF-8 character.
REPLACEMENT = "\ufffd"

OnToken = Callable[[int, int], None]  # (row, token id), called as each new token is chosen


# ------------------------------------------------------------------------------------------ model state
@contextlib.contextmanager
def eval_mode(model) -> Iterator:
    """``model`` in eval mode (dropout off) for the block; afterwards, also when the block raises, every
    module's own ``training`` flag is what it was before (not only the root's: a module that was left in
    eval mode inside a training model stays so).

    The flags are put back with ``Module.train`` (root first, then each module that differs, in
    pre-order, so that a parent's call never undoes a child's), because some modules do work there
    (PEFT's DoRA layers drop their cached weight norms when they go back to training)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            if module.training != training:
                module.train(training)


@contextlib.contextmanager
def adapter_enabled(model, enabled: bool) -> Iterator:
    """The block with ``model``'s adapter as it is (``enabled``) or switched off (PEFT's
    ``disable_adapter()``: the base's own answer); the adapter is back on afterwards."""
    if enabled:
        yield model
        return
    with model.disable_adapter():
        yield model


def model_device(model) -> torch.device:
    """Where the model's inputs go: the device of its first parameter."""
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ next token
@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0: greedy (argmax, deterministic); above 0: a draw
    from ``softmax(logits / temperature)`` restricted to the top-``top_p`` nucleus, from a generator
    seeded with ``seed`` (None: a fresh random seed, so the answer does not repeat)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def logits_processors(temperature: float, top_p: float):
    """transformers' ``LogitsProcessorList`` for sampling: ``TemperatureLogitsWarper`` then
    ``TopPLogitsWarper``, in the order ``generate`` applies them, each left out where it would change
    nothing (temperature 1, top_p 1), as ``generate`` leaves them out. ``temperature`` must be > 0.

    These processors read only the scores, never the tokens so far: :class:`Sampler` passes them an
    empty ``input_ids``."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))  # it refuses an int
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(float(top_p)))
    return processors


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator of its own on ``device``, seeded with ``seed`` (any Python int: taken modulo 2**64,
    the range torch accepts), or with a fresh random seed when ``seed`` is None. The global generator
    is neither read nor moved, so a request's draws depend on its seed alone."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (1 << 64))
    return generator


def draw(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of processed ``scores`` ([rows, vocab], float), drawn from their softmax with
    ``generator`` (on the scores' device); returns a [rows] int64 tensor."""
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class Sampler:
    """The next-token rule of one sequence (one request, one prompt): argmax when greedy, otherwise
    :func:`logits_processors` and :func:`draw` from the sequence's own generator, created on the device
    of the first logits it sees and seeded with ``sampling.seed``. Two samplers with the same settings
    and seed, given the same logits, choose the same tokens."""

    def __init__(self, sampling: Sampling = GREEDY):
        self.sampling = sampling
        self.processors = None if sampling.greedy else logits_processors(sampling.temperature, sampling.top_p)
        self.generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.sampling.greedy

    def sample(self, scores: torch.Tensor) -> int:
        """A drawn token for float32 logits ``scores`` of shape [1, vocab]."""
        if self.generator is None:
            self.generator = seeded_generator(self.sampling.seed, scores.device)
        history = scores.new_zeros((scores.shape[0], 0), dtype=torch.long)  # unread, see logits_processors
        return int(draw(self.processors(history, scores), self.generator)[0])


def choose_next(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """The next token of each row of ``logits`` ([rows, vocab], the last position's, any float dtype),
    by that row's sampler; returns [rows] int64 on the logits' device.

    Logits are taken to float32 first, as ``generate`` does, so a greedy row's argmax is ``generate``'s.
    A sampled row is processed and drawn alone ([1, vocab]): its token does not depend on which other
    rows share the batch."""
    scores = logits.float()
    chosen = scores.argmax(-1)
    for row, sampler in enumerate(samplers):
        if not sampler.greedy:
            chosen[row] = sampler.sample(scores[row : row + 1])
    return chosen


# ------------------------------------------------------------------------------------------ forwards
def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int | None, device) -> dict:
    """The model inputs of the first forward over ``prompts``: left-padded ``input_ids`` and
    ``attention_mask`` ([rows, longest prompt], int64), ``position_ids`` counting real tokens only, a
    cache requested, logits of the last position only. Left padding puts every row's last token in
    the last column, where its next token is read. ``pad_id`` None: 0 (padding is masked anyway)."""
    ids, mask = left_padded([list(p) for p in prompts], 0 if pad_id is None else pad_id)
    ids, mask = ids.to(device), mask.to(device)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "use_cache": True,
        "logits_to_keep": 1,
    }


def step_inputs(last: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> dict:
    """The model inputs of one decoding step: each row's latest token ``last`` ([rows]), the attention
    mask over the cache and this token (``mask``, [rows, cached + 1]), each row's position
    (``positions``, [rows]) and the cache of the earlier forwards."""
    return {
        "input_ids": last[:, None],
        "attention_mask": mask,
        "position_ids": positions[:, None],
        "cache": cache,
        "use_cache": True,
    }


def _eos_ids(model, eos_id: int | None) -> set[int]:
    """``eos_id``, or, when None, the EOS token(s) of the model's generation config (``generate``'s
    default)."""
    if eos_id is not None:
        return {int(eos_id)}
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}


@torch.no_grad()
def decode_loop(
    model,
    prompts: Sequence[Sequence[int]],
    samplers: Sequence[Sampler],
    *,
    max_new_tokens: int,
    pad_id: int | None,
    eos_id: int | None = None,
    fixed_length: bool = False,
    on_token: OnToken | None = None,
    device=None,
    repeats: int = 1,
) -> list[list[int]]:
    """New tokens for each of ``prompts`` (lists of token ids), row ``i`` chosen by ``samplers[i]``, with
    a key/value cache: one prefill forward (:func:`prefill_inputs`), then one forward per token
    (:func:`step_inputs`), the same forwards as :mod:`lit_lora.serve.engine` makes for a batch of
    these rows. A row ends after its EOS token (included in its list; ``eos_id`` None: the model's
    own) or ``max_new_tokens``, and leaves the batch. ``fixed_length``: EOS is never chosen, every row
    gets exactly ``max_new_tokens`` tokens. ``on_token(row, token)`` is called for each new token.

    ``repeats`` > 1: each prompt is answered ``repeats`` times (rows ``i * repeats ... i * repeats +
    repeats - 1``, one sampler each, ``len(prompts) * repeats`` in all), its prefill computed once and
    its key/value cache copied to its rows (GRPO's group of completions of one prompt).

    Runs the model as it is (train/eval flags, adapter): :func:`generate_tokens` sets those."""
    if max_new_tokens < 1 or repeats < 1 or len(samplers) != len(prompts) * repeats:
        raise ValueError("decode_loop needs max_new_tokens >= 1 and one sampler per prompt and repeat")
    if not prompts:
        return []
    device = device if device is not None else model_device(model)
    eos = _eos_ids(model, eos_id)
    banned = torch.tensor(sorted(eos), dtype=torch.long) if fixed_length and eos else None
    inputs = prefill_inputs(prompts, pad_id, device)
    out = model(**inputs)
    mask, cache, last_logits = inputs["attention_mask"], out.cache, out.logits[:, -1, :]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        mask, last_logits = mask.repeat_interleave(repeats, 0), last_logits.repeat_interleave(repeats, 0)
    positions = mask.sum(-1)  # each row's next position: its count of real tokens
    rows = list(range(len(samplers)))  # the rows still decoding, in batch order
    answers: list[list[int]] = [[] for _ in samplers]
    while True:
        logits = last_logits if last_logits is not None else out.logits[:, -1, :]
        last_logits = None
        if banned is not None:
            logits = logits.index_fill(-1, banned.to(logits.device), float("-inf"))
        last = choose_next(logits, [samplers[row] for row in rows])
        del out  # the prefill's logits can be large: not kept alive during the next forward
        keep = []
        for index, (row, token) in enumerate(zip(rows, last.tolist(), strict=True)):
            answers[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if len(answers[row]) < max_new_tokens and (fixed_length or token not in eos):
                keep.append(index)
        if not keep:
            return answers
        if len(keep) < len(rows):  # finished rows leave the batch (and the cache)
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            rows = [rows[i] for i in keep]
            mask, positions, last = mask[index], positions[index], last[index]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(**step_inputs(last, mask, positions, cache))
        cache, positions = out.cache, positions + 1


class _Relay:
    """A ``generate`` streamer (the ``put`` / ``end`` of transformers' ``BaseStreamer``) that hands each row's new tokens to ``on_token(row, token)``: the first
    ``put`` (the prompts) is skipped, and so is the padding ``generate`` puts after a row's EOS."""

    def __init__(self, on_token: OnToken, rows: int, eos: set[int], fixed_length: bool):
        self.on_token, self.eos, self.fixed_length = on_token, eos, fixed_length
        self.done = [False] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            self.on_token(row, token)
            self.done[row] = not self.fixed_length and token in self.eos

    def end(self) -> None:
        pass


def _generate_greedy(
    model, prompts, *, max_new_tokens, pad_id, eos_id, fixed_length, on_token, device
) -> list[list[int]]:
    """Greedy answers through ``model.generate``; rows cut after their first EOS (``generate`` pads
    the rows that ended before the longest)."""
    inputs = prefill_inputs(prompts, pad_id, device)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        # Unset, so that a model's sampling defaults (generation_config.json) neither warn nor apply.
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": pad_id,
    }
    if eos_id is not None:  # otherwise the model's own, as generate chooses
        kwargs["eos_token_id"] = eos_id
    if fixed_length:  # EOS masked until max_new_tokens: every row the same length
        kwargs["min_new_tokens"] = max_new_tokens
    eos = _eos_ids(model, eos_id)
    if on_token is not None:
        kwargs["streamer"] = _Relay(on_token, len(prompts), eos, fixed_length)
    width = inputs["input_ids"].shape[1]
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)
    answers = []
    for row in out[:, width:].tolist():
        if not fixed_length:
            end = next((i for i, token in enumerate(row) if token in eos), None)
            row = row if end is None else row[: end + 1]
        answers.append(row)
    return answers


@torch.no_grad()
def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int | None,
    eos_id: int | None = None,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    adapter: bool = True,
    fixed_length: bool = False,
    on_token: OnToken | None = None,
    device=None,
) -> list[list[int]]:
    """The answers (new token ids, one list per prompt, in order) of ``model`` to ``prompts`` (lists of
    token ids, decoded together in one left-padded batch; callers choose the batch size).

    - ``sampling``: one :class:`Sampling` for every prompt or one per prompt. All greedy: transformers'
      ``model.generate(do_sample=False)``. Otherwise :func:`decode_loop`; a seeded row then answers as
      that prompt alone with the same seed (each row has its own generator), up to the float
      round-off that padding brings to a batch of several.
    - A row ends after its EOS token, which its list includes (``eos_id``; None: the model's
      generation config's), or after ``max_new_tokens``. ``fixed_length``: EOS is never chosen,
      every list has ``max_new_tokens`` tokens.
    - ``adapter`` False: the base's answer (PEFT's ``disable_adapter()``).
    - ``on_token(row, token)``: called with each new token as soon as it is chosen (streaming).
    - ``device``: where the inputs go (default: the model's first parameter's device).

    The model runs in eval mode, without gradients; its train/eval flags and its adapter are restored
    afterwards, also when decoding raises."""
    samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
    if len(samplings) != len(prompts):
        raise ValueError(f"{len(samplings)} samplings for {len(prompts)} prompts")
    if not prompts:
        return []
    device = device if device is not None else model_device(model)
    decoding = dict(
        max_new_tokens=max_new_tokens,
        pad_id=pad_id,
        eos_id=eos_id,
        fixed_length=fixed_length,
        on_token=on_token,
        device=device,
    )
    with eval_mode(model), adapter_enabled(model, adapter):
        if all(s.greedy for s in samplings):
            return _generate_greedy(model, prompts, **decoding)
        return decode_loop(model, prompts, [Sampler(s) for s in samplings], **decoding)


# ------------------------------------------------------------------------------------------ text
class IncrementalDetokenizer:
    """The text of a growing token sequence, handed out as deltas whose concatenation is
    ``decode(all tokens)``, each step costing a decode of a few tokens rather than of the whole answer.

    ``decode`` maps token ids to text (e.g. ``tokenizer.decode(ids, skip_special_tokens=True)``). Only a
    window is kept: a few tokens already emitted (``context``; a token's text can depend on its
    neighbour: SentencePiece drops the space of a first token, byte-level BPE splits characters) and
    the tokens not emitted yet. :meth:`push` decodes the window, and the text past the context's own is
    the delta. While the window's text ends with U+FFFD, its last character's bytes are not all there
    yet, so nothing is emitted until they are. :meth:`flush` emits whatever is held back (a final
    incomplete character as U+FFFD, as the full decode shows it).

    The window always starts where an earlier emit ended, at a character boundary, so its text is
    never a broken tail of the text before it."""

    def __init__(self, decode: Callable[[list[int]], str], context: int = 4):
        self._decode = decode
        self._context = context
        self._window: list[int] = []  # emitted context tokens, then the pending ones
        self._read = 0  # window[:_read] is emitted context, window[_read:] pending
        self._blocks: list[int] = []  # where each emitted block of the context starts in the window
        self._context_text = ""  # decode(window[:_read])

    @classmethod
    def for_tokenizer(cls, tokenizer, context: int = 4) -> IncrementalDetokenizer:
        """Deltas of ``tokenizer.decode(ids, skip_special_tokens=True)``."""
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), context)

    def push(self, tokens: int | Sequence[int]) -> str:
        """Add ``tokens``; the text they complete ("" while a character is incomplete)."""
        self._window.extend([tokens] if isinstance(tokens, int) else tokens)
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back (an incomplete last character included), at the end of a sequence."""
        if self._read == len(self._window):
            return ""
        return self._emit(self._decode(self._window))

    def _emit(self, text: str) -> str:
        # A decode that is not prefix-stable (a tokenizer's space clean-up reaching back into the
        # context) would make text not start with the context's text; what was sent stays sent, so the
        # delta is still what lies past the context's length.
        delta = text[len(self._context_text) :]
        self._blocks.append(self._read)
        self._read = len(self._window)
        self._context_text = text
        # Drop whole leading blocks while what is left still holds `context` tokens.
        drop = 0
        for start in self._blocks[1:]:
            if self._read - start < self._context:
                break
            drop = start
        if drop:
            self._window = self._window[drop:]
            self._read -= drop
            self._blocks = [start - drop for start in self._blocks if start >= drop]
            self._context_text = self._decode(self._window)
        return delta
