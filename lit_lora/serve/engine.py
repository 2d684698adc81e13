"""Batched decoding for :mod:`lit_lora.serve.server`: one base model in memory, any number of named LoRA adapters.

Requests ("jobs") for different adapters are decoded together in one batch: PEFT's mixed-adapter batches
(``adapter_names=``, ``"__base__"`` for the base) add each row's own low-rank update to the shared base
computation. Batching is continuous: a job that arrives while others decode is prefilled on its own and
joins the running batch at the next step (its key/value cache left-padded to the batch's length), and a
job that ends, or whose client went away, leaves the batch at once. Adapters that cannot share a batch
(DoRA) are decoded one adapter at a time instead.

All model work happens on one engine thread; the server talks to it through :meth:`Engine.submit`,
:meth:`Engine.call` (run something between two steps, e.g. load an adapter) and each job's ``sink``, which
the engine calls with :class:`Delta`, :class:`Finished` or :class:`Failed` events and must not block.

What is decoding rather than scheduling comes from :mod:`lit_lora.inference.decoding`: the inputs of the
prefill and step forwards, the next-token choice (argmax in float32, or transformers' temperature and
top-p processors and a draw from the request's own generator seeded with its ``seed``) and the
streaming text (an incremental detokenizer). Greedy decoding of a batch of one computes exactly what
``model.generate`` computes (same positions, same cache, logits of the last position only, argmax in
float32), and a sampled one exactly what :mod:`lit_lora.apps.generate` computes with the same
temperature, top_p and seed, so a lone request answers token for token as ``generate`` does; in a
larger batch, padding changes only float round-off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from lit_lora.inference.decoding import (
    IncrementalDetokenizer,
    Sampler,
    Sampling,
    choose_next,
    prefill_inputs,
    step_inputs,
)

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


@dataclass
class Delta:
    """Text that follows what was sent before (streaming jobs only)."""

    text: str


@dataclass
class Finished:
    text: str  # the whole answer, stop string and EOS excluded
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    completion_tokens: int  # tokens generated, EOS included


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request: its prompt tokens, how to decode, and where its events go."""

    adapter: str | None  # PEFT adapter name; None: the base alone
    prompt: list[int]
    max_tokens: int
    eos_id: int | None
    decode: Callable[[list[int]], str]  # token ids -> text, special tokens skipped
    sink: Callable[[Event], None]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the answer's text so far (what the detokenizer has released)
    sent: int = 0  # characters of text already sent as deltas
    cancelled: bool = False  # set by the server when the client goes away
    done: bool = False
    sampler: Sampler = field(init=False)  # the next-token rule, with the request's own generator
    detokenizer: IncrementalDetokenizer = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = Sampler(Sampling(self.temperature, self.top_p, self.seed))
        self.detokenizer = IncrementalDetokenizer(self.decode)


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new jobs."""


class Engine:
    """The decoding loop on its own thread. ``model`` may be a plain transformers model (the base alone)
    or a ``PeftModel`` holding every adapter; :meth:`call` may replace it (``engine.model = ...``)."""

    def __init__(self, model, *, pad_id: int, max_batch_size: int = 16, batch_timeout: float = 0.01):
        self.model = model
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.served_tokens = 0  # tokens generated since start
        self.cancelled = 0  # jobs dropped because their client went away
        self.peak_batch = 0  # the most rows decoded in one step
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._tasks: deque[tuple[Callable[[], object], Future]] = deque()
        self._closed = False
        self._rows: list[Job] = []
        self._cache = None  # the batch's key/value cache (DynamicCache), rows in self._rows order
        self._mask: torch.Tensor | None = None  # [rows, cached length] 1 where a real token is cached
        self._pos: torch.Tensor | None = None  # [rows] position of each row's next token
        self._last: torch.Tensor | None = None  # [rows] each row's latest token, fed at the next step
        self._mode: str | None = None  # the adapter the model runs now (see _switch)
        self._mode_of = None  # ... for this model object (an adapter load may replace it)
        self._thread = threading.Thread(target=self._run, name="lit-lora-engine", daemon=True)

    # -- the server's side ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            self._queue.append(job)
            self._cv.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the engine thread before the next step; its result or exception in the future."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            self._tasks.append((fn, future))
            self._cv.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the ones queued or decoding, stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {
                "active": len(self._rows),
                "queued": len(self._queue),
                "generated_tokens": self.served_tokens,
                "cancelled": self.cancelled,
                "peak_batch": self.peak_batch,
            }

    # -- the engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._queue or self._rows or self._tasks or self._closed):
                    self._cv.wait()
                if self._closed and not (self._queue or self._rows or self._tasks):
                    return
                tasks = list(self._tasks)
                self._tasks.clear()
            for fn, future in tasks:
                self._mode_of = None  # a task may change the adapters: switch anew at the next forward
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the caller, who reports it
                    future.set_exception(err)
            admit = self._admit()
            try:
                if admit:
                    self._prefill(admit)
                if self._rows:
                    self._step()
            except Exception as err:  # a failed forward fails its batch, never the engine
                log.exception("decoding failed")
                for job in [*self._rows, *admit]:
                    if not job.done:
                        job.done = True
                        job.sink(Failed(f"generation failed: {type(err).__name__}: {err}"))
                self._reset()

    def _admit(self) -> list[Job]:
        """Jobs that join the batch now. An idle engine waits up to ``batch_timeout`` for a fuller batch."""
        with self._cv:
            if not self._rows and self._queue and self.batch_timeout > 0:
                deadline = time.monotonic() + self.batch_timeout
                while len(self._queue) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            if self._rows and not self._can_extend():
                return []
            mixed = self._mixable()
            group = self._rows[0].adapter if self._rows else None
            admit, keep = [], deque()
            while self._queue:
                job = self._queue.popleft()
                if job.cancelled:
                    job.done = True
                    self.cancelled += 1
                    continue
                full = len(self._rows) + len(admit) >= self.max_batch_size
                if not mixed and (self._rows or admit):
                    group = group if self._rows else admit[0].adapter
                    full = full or job.adapter != group
                (keep if full else admit).append(job)
            self._queue = keep
            return admit

    def _can_extend(self) -> bool:
        """A running batch takes new rows only where every cache layer is a plain growing one."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def _mixable(self) -> bool:
        """Whether rows of different adapters may share a batch (PEFT refuses mixed batches with DoRA)."""
        configs = getattr(self.model, "peft_config", {})
        return not any(getattr(c, "use_dora", False) for c in configs.values())

    def _forward(self, jobs: list[Job], **inputs):
        """One forward of ``jobs``' rows. A batch of one adapter (or of the base alone) runs the model as
        ``generate`` does, with that adapter switched on (switching costs a pass over the modules, so it
        happens only when the batch's adapter changes); only a batch of several adapters goes through
        PEFT's mixed-batch path, whose hooks are set up anew at every forward."""
        if not hasattr(self.model, "peft_config"):
            return self.model(**inputs)
        names = [job.adapter or BASE for job in jobs]
        if len(set(names)) == 1:
            self._switch(names[0])
            return self.model(**inputs)
        self._switch(None)
        return self.model(**inputs, adapter_names=names)

    def _switch(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``BASE``: adapter layers off; None: on, for a mixed batch)."""
        if name == self._mode and self.model is self._mode_of:
            return
        tuner = self.model.base_model
        if name == BASE:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            if name is not None:
                self.model.set_adapter(name)
        self._mode, self._mode_of = name, self.model

    def _prefill(self, jobs: list[Job]) -> None:
        inputs = prefill_inputs([job.prompt for job in jobs], self.pad_id, self._device())
        mask = inputs["attention_mask"]
        out = self._forward(jobs, **inputs)
        first = choose_next(out.logits[:, -1, :], [job.sampler for job in jobs])
        if self._rows:
            self._join(out.cache, mask)
            self._pos = torch.cat([self._pos, mask.sum(-1)])
            self._last = torch.cat([self._last, first])
            self._rows.extend(jobs)
        else:
            self._cache, self._mask, self._pos, self._last = out.cache, mask, mask.sum(-1), first
            self._rows = list(jobs)
        self._advance(jobs, first)

    def _join(self, cache, mask: torch.Tensor) -> None:
        """Append the rows of ``cache`` / ``mask`` to the batch, left-padding the shorter side."""
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self._mask = torch.cat([_left_pad(self._mask, length, dim=1), _left_pad(mask, length, dim=1)])

    def _step(self) -> None:
        self.peak_batch = max(self.peak_batch, len(self._rows))
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        out = self._forward(self._rows, **step_inputs(self._last, self._mask, self._pos, self._cache))
        self._cache = out.cache
        self._pos = self._pos + 1
        self._last = choose_next(out.logits[:, -1, :], [job.sampler for job in self._rows])
        self._advance(self._rows, self._last)

    def _advance(self, jobs: list[Job], tokens: torch.Tensor) -> None:
        """Record each row's new token, send what can be sent, then drop finished and abandoned rows."""
        for job, token in zip(jobs, tokens.tolist(), strict=True):
            job.tokens.append(token)
            self.served_tokens += 1
            _progress(job)
        keep = [row for row, job in enumerate(self._rows) if not (job.done or job.cancelled)]
        if len(keep) == len(self._rows):
            return
        for job in self._rows:
            if job.cancelled and not job.done:
                job.done = True
                self.cancelled += 1
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._rows = [self._rows[row] for row in keep]
        self._mask, self._pos, self._last = self._mask[index], self._pos[index], self._last[index]
        # Columns that are padding for every remaining row are dropped from the cache.
        start = int(self._mask.any(0).nonzero()[0])
        if start:
            self._mask = self._mask[:, start:]
            _crop_left(self._cache, start)

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device


def _left_pad(tensor: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _crop_left(cache, start: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[..., start:, :]
        layer.values = layer.values[..., start:, :]


def _progress(job: Job) -> None:
    """After a new token: finish the job (EOS, a stop string, max_tokens) or send the text that is safe
    to send (not a possible start of a stop string; the detokenizer already holds back a split UTF-8
    character). Costs O(new text): the detokenizer decodes a few tokens, and a stop string can only
    newly appear where it overlaps the new text."""
    ended = job.eos_id is not None and job.tokens[-1] == job.eos_id
    last = ended or len(job.tokens) >= job.max_tokens
    delta = job.detokenizer.push(job.tokens[-1])
    if last:
        delta += job.detokenizer.flush()
    longest = max((len(s) for s in job.stop), default=0)
    start = max(len(job.text) - longest + 1, 0)  # earlier text was searched at earlier steps
    job.text += delta
    cut = min((i for i in (job.text.find(s, start) for s in job.stop) if i >= 0), default=-1)
    if cut >= 0:
        return _finish(job, job.text[:cut], "stop")
    if ended:
        return _finish(job, job.text, "stop")
    if last:
        return _finish(job, job.text, "length")
    if job.stream:
        safe = len(job.text) - max(longest - 1, 0)
        if safe > job.sent:
            job.sink(Delta(job.text[job.sent : safe]))
            job.sent = safe
    return None


def _finish(job: Job, text: str, reason: str) -> None:
    job.done = True
    if job.stream and len(text) > job.sent:
        job.sink(Delta(text[job.sent :]))
        job.sent = len(text)
    job.sink(Finished(text, reason, len(job.tokens)))
