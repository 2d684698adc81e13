"""Retention: what fine-tuning costs the base model, measured at every validation.

The probe: general prompts written by the team (``lit_lora/samples/retention_probes.json``: a few dozen,
several domains, English and Vietnamese, none from a training task), each rendered as a one-turn
conversation with the run's own chat template, and the base model's own greedy continuation of each
(``max_new_tokens`` tokens, generated once with the adapter off and cached on disk by model, tokenizer,
chat template, probe file and length, so later runs of the same base skip it).

At each validation the probe sequences run through the model with the adapter on, packed several to a
row after the chat template's shared system prefix, in one forward (:meth:`Retention._batches`); the
base's answer (adapter off, the same batches) is computed at the first validation and kept, since the
base never changes. Over the continuation positions only, in float32 over the full vocabulary:

- ``retention/kl``: mean per-token KL(base || tuned);
- ``retention/nll_ratio``: the tuned model's negative log-likelihood of the base's continuations over the
  base's own (1.0: no drift);
- ``retention/agreement``: share of positions where the tuned model's greedy next token is the base's.

They are logged through every logger, kept in ``summary.json`` (with the probe's cost in time, against the
validation it rides on), and may drive checkpoint choice (``callbacks.adapter_checkpoint.monitor``). A KL
above ``warn_kl`` prints one line at that validation and is recorded in the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lit_lora.config.schema import SAMPLES_DIR

log = logging.getLogger(__name__)

PROBE_FILE = SAMPLES_DIR / "retention_probes.json"
METRICS = ("retention/kl", "retention/nll_ratio", "retention/agreement")


def load_probes(path: str | Path | None = None) -> tuple[list[str], str]:
    """The probe prompts of ``path`` (default: the committed set) and the file's sha256."""
    from lit_lora.errors import UserError

    path = Path(path or PROBE_FILE).expanduser()
    try:
        raw = path.read_bytes()
        prompts = [p["text"] if isinstance(p, dict) else str(p) for p in json.loads(raw)["prompts"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"callbacks.retention.probe_file={path}: not a readable probe file ({err})") from err
    if not prompts:
        raise UserError(f"callbacks.retention.probe_file={path} holds no prompts")
    return prompts, hashlib.sha256(raw).hexdigest()


def probe_key(
    model_id: str, tokenizer, chat_template: str | None, probe_hash: str, max_new_tokens: int
) -> str:
    """The cache key of a probe set's base continuations: every input that changes them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        model_id,
        hashlib.sha256(vocab.encode()).hexdigest(),
        chat_template or "",
        probe_hash,
        str(max_new_tokens),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def model_identity(model_cfg, quant_cfg=None) -> str:
    """What names the base's weights: hub id and revision, or the local files (paths, sizes, mtimes), plus
    the dtype the frozen weights run in (the continuations are the base's as this run computes them)."""
    from lit_lora.models import embedded

    name = str(model_cfg.name_or_path)
    ident = [name, str(model_cfg.revision), str(model_cfg.dtype), str(model_cfg.random_init)]
    ident.append(str(getattr(quant_cfg, "method", None)))
    ident.append(
        json.dumps(dict(getattr(model_cfg, "config_overrides", None) or {}), sort_keys=True, default=str)
    )
    if embedded.is_embedded(name):
        ident.append(embedded.file_digest(embedded.gguf_path(name.split(":", 1)[1])))
    elif Path(name).expanduser().is_dir():
        for f in sorted(Path(name).expanduser().glob("*")):
            if f.suffix in (".safetensors", ".json", ".bin"):
                ident.append(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}")
    return "|".join(ident)


@dataclass(frozen=True)
class BaseAnswer:
    """The base's side of the probe, computed once per run (the base never changes): at each scored
    position its log-probabilities and probabilities, its greedy token, and its negative log-likelihood
    of the continuation token. Float32."""

    logp: torch.Tensor  # [positions, vocab]
    probs: torch.Tensor  # [positions, vocab]
    greedy: torch.Tensor  # [positions]
    nll: torch.Tensor  # [positions]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> BaseAnswer:
        logp = F.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        return cls(
            logp=logp,
            probs=probs,
            greedy=logp.argmax(-1),
            nll=-logp.gather(-1, targets[:, None]).squeeze(-1),
        )


DRIFT_CHUNK = 32  # positions per float32 pass: 32 x 49k vocab = 6 MB, under glibc's 32 MiB mmap threshold


def drift(base: BaseAnswer, tuned_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The three metrics from the base's answer and the tuned model's logits ``[positions, vocab]``
    (any float dtype: each chunk is cast to float32).

    KL is summed as ``p * (log p - log q)``, never as ``sum p log p - sum p log q``: for a small drift
    the two sums are close, and float32 cancellation alone moved the tiny model's KL (about 2e-3) by
    0.09 %, ten times the independent check's tolerance (measured). The work goes in chunks of
    :data:`DRIFT_CHUNK` positions so that its temporaries are reused from the heap instead of mapped
    and page-faulted afresh at every validation (``lit_lora.speedups.allocator``).
    """
    kl, nll, agree = [], [], []
    for start in range(0, tuned_logits.shape[0], DRIFT_CHUNK):
        part = slice(start, start + DRIFT_CHUNK)
        logq = F.log_softmax(tuned_logits[part].float(), dim=-1)
        kl.append(torch.einsum("pv,pv->p", base.probs[part], base.logp[part] - logq))
        nll.append(-logq.gather(-1, targets[part, None]).squeeze(-1))
        agree.append(logq.argmax(-1) == base.greedy[part])
    return {
        "retention/kl": float(torch.cat(kl).mean()),
        "retention/nll_ratio": float(torch.cat(nll).mean() / base.nll.mean().clamp_min(1e-12)),
        "retention/agreement": float(torch.cat(agree).float().mean()),
    }


@dataclass(frozen=True)
class ProbeBatch:
    """One forward of the probe: see :meth:`Retention._batches`."""

    prefix: list[int]
    inputs: dict  # input_ids, attention_mask (rows, 1, width, prefix + width), position_ids
    where: torch.Tensor  # flat positions (row * width + t) that predict a continuation token, probe order
    targets: torch.Tensor  # those tokens (CPU)
    inline: bool  # the prefix starts row 0 (lit-lora's attention, one forward) or runs first as a cache


def shares_prefix(model) -> bool:
    """Whether ``model`` runs lit-lora's attention, which reads a prefix shared by every row
    (``shared_prefix``); transformers' own implementations would ignore it."""
    from lit_lora.speedups.attention import LIT_ATTENTION

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) == LIT_ATTENTION


def _pack(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows: first fit, longest first, at the row width (from the
    longest length to twice it) that leaves the fewest tokens in all. Deterministic: ties keep their order
    and the narrower width wins (attention grows with the width)."""

    def first_fit(width: int) -> list[list[int]]:
        rows: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
            if row is None:
                rows.append([])
                room.append(width)
                row = len(rows) - 1
            rows[row].append(index)
            room[row] -= lengths[index]
        return rows

    widths = range(max(lengths), 2 * max(lengths) + 1)
    best = min(widths, key=lambda w: (len(first_fit(w)) * w, w))
    return first_fit(best)


class Retention(L.Callback):
    """See the module docstring. ``enabled=false`` turns it off (``callbacks.retention.enabled=false``)."""

    def __init__(
        self,
        enabled: bool = True,
        probe_file: str | None = None,
        max_new_tokens: int = 4,
        batch_size: int = 32,
        warn_kl: float | None = 0.5,
        model=None,
        quant=None,
        cache_dir: str | None = None,
    ):
        from lit_lora.errors import UserError

        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"callbacks.retention.{name} must be a whole number >= 1, got {value!r}")
        self.enabled = enabled
        self.probe_file = probe_file
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.warn_kl = warn_kl
        # The run's model and quant configs (conf/callbacks/retention.yaml interpolates them): they name
        # the base whose continuations are cached.
        self.model_cfg, self.quant_cfg = model, quant
        self.cache_dir = cache_dir
        self.sequences: list[tuple[list[int], list[int]]] = []  # (prompt ids, base continuation ids)
        self.cache_hit: bool | None = None
        self.inline: bool | None = None  # the prefix in the batch's first row (None: where supported)
        self._batches_kept: list[ProbeBatch] | None = (
            None  # the packed probe batches (built at the first measurement)
        )
        self._base: BaseAnswer | None = None  # the base's answer (adapter off), kept on the CPU
        self.last: dict[str, float] = {}
        self.history: list[dict] = []
        self.warnings: list[str] = []
        self.probe_s: list[float] = []
        self.validation_s: list[float] = []
        self._val_started: float | None = None
        self._probe_this_val = 0.0
        self.base_s = 0.0  # generating the base's continuations (once per base: cached)
        self.base_pass_s = 0.0  # the base's answer on the probe (once per run)

    # -- probe set -----------------------------------------------------------------------------------
    def _cache_file(self, key: str) -> Path:
        from lit_lora.models.embedded import cache_root

        return (
            Path(self.cache_dir).expanduser() / f"{key}.json"
            if self.cache_dir
            else cache_root() / "retention" / f"{key}.json"
        )

    def build_probes(self, pl_module, trainer=None) -> None:
        """Prompt ids and the base's greedy continuations: from the cache, or generated with the adapter off."""
        from lit_lora.data.rendering import prompt_ids
        from lit_lora.staging import write_text_atomic

        tokenizer, rendering = pl_module.tokenizer, pl_module.rendering
        prompts, probe_hash = load_probes(self.probe_file)
        ids = [prompt_ids(tokenizer, rendering, [{"role": "user", "content": p}]) for p in prompts]
        model_id = model_identity(self.model_cfg, self.quant_cfg) if self.model_cfg is not None else "unknown"
        key = probe_key(model_id, tokenizer, rendering.chat_template, probe_hash, self.max_new_tokens)
        cache = self._cache_file(key)
        if cache.is_file():
            stored = json.loads(cache.read_text())
            if stored.get("prompt_ids") == ids:
                self.sequences = list(zip(ids, stored["continuations"], strict=True))
                self.cache_hit = True
                return
        started = time.perf_counter()
        context = (
            trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        )
        with context:  # the run's precision (autocast under bf16-mixed), as validation computes
            continuations = self._generate(pl_module, ids, tokenizer)
        self.base_s = time.perf_counter() - started
        self.sequences = list(zip(ids, continuations, strict=True))
        self.cache_hit = False
        body = {"prompt_ids": ids, "continuations": continuations, "max_new_tokens": self.max_new_tokens}
        write_text_atomic(cache, json.dumps(body))

    def _generate(self, pl_module, ids: list[list[int]], tokenizer) -> list[list[int]]:
        """Greedy continuations by the base (adapter off), in fixed order and batches: deterministic."""
        from lit_lora.inference.decoding import adapter_enabled, eval_mode, generate_tokens

        model = pl_module.model
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out: list[list[int]] = []
        with eval_mode(model), adapter_enabled(model, False):
            for start in range(0, len(ids), self.batch_size):
                out += generate_tokens(
                    model,
                    ids[start : start + self.batch_size],
                    max_new_tokens=self.max_new_tokens,
                    pad_id=pad,
                    fixed_length=True,  # EOS never ends a probe early: every probe weighs the same
                    device=pl_module.device,
                )
        return out

    # -- measurement ---------------------------------------------------------------------------------
    def _prefix(self) -> list[int]:
        """The tokens every probe starts with (the chat template's system turn and header), computed once
        per batch and shared, at least one token of each prompt left after it."""
        prompts = [p for p, _ in self.sequences]
        n = 0
        while n < min(map(len, prompts)) - 1 and all(p[n] == prompts[0][n] for p in prompts):
            n += 1
        return prompts[0][:n]

    def _batches(self, device, inline: bool) -> list[ProbeBatch]:
        """The probe as packed batches: the shared prefix, then each sequence packed with others into
        rows (as many as fit at the width :func:`_pack` chooses); each batch with the flat positions that
        predict a continuation token, and those tokens.

        Packing rather than padding: the probes differ in length by up to 3x, and on a CPU the cost of a
        forward is its token count, so a padded batch spent about 40 % of its work on padding. The last
        continuation token is left out: no scored position reads it.

        Every row's keys are laid out as ``[prefix | the row's own]``, and a boolean mask
        (rows, 1, width, P + width) keeps each sequence to the prefix and its own earlier tokens, with
        position ids restarting after the prefix: every sequence sees exactly what it would see alone.
        ``inline``: the prefix's tokens start row 0 and lit-lora's attention puts their keys in front of
        every row (``shared_prefix``, one forward). Otherwise the prefix runs first and its key/value
        cache is repeated for the rows (two forwards; for models on another attention implementation).
        """
        prefix = self._prefix()
        size = len(prefix)
        batches = []
        for start in range(0, len(self.sequences), self.batch_size):
            chunk = self.sequences[start : start + self.batch_size]
            segments = [(prompt[size:] + cont[:-1], prompt, cont) for prompt, cont in chunk]
            lengths = [len(rest) for rest, _, _ in segments]
            rows = _pack([*lengths, size] if inline else lengths)
            if inline:  # the prefix (index len(segments)) first in row 0
                rows.sort(key=lambda members: len(segments) not in members)
                rows[0].remove(len(segments))
                rows[0].insert(0, len(segments))
            width = max(sum(size if i == len(segments) else lengths[i] for i in members) for members in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            positions = torch.full((len(rows), width), size, dtype=torch.long)
            # True where a query may attend. Every query sees the prefix.
            mask = torch.zeros((len(rows), 1, width, size + width), dtype=torch.bool)
            mask[..., :size] = True
            causal = torch.ones((width, width), dtype=torch.bool).tril()
            scored: dict[int, tuple[list[int], list[int]]] = {}  # probe index -> (positions, tokens)
            for row, members in enumerate(rows):
                at = 0
                for index in members:
                    if index == len(segments):  # the prefix itself: causal over the prefix columns
                        ids[row, :size] = torch.tensor(prefix)
                        positions[row, :size] = torch.arange(size)
                        mask[row, 0, :size, :size] = causal[:size, :size]
                        at = size
                        continue
                    rest, prompt, cont = segments[index]
                    span = slice(at, at + len(rest))
                    ids[row, span] = torch.tensor(rest)
                    positions[row, span] = torch.arange(size, size + len(rest))
                    mask[row, 0, span, size + at : size + at + len(rest)] = causal[: len(rest), : len(rest)]
                    # Position t predicts token t + 1: the continuation from the prompt's last token on.
                    first = at + len(prompt) - size - 1
                    scored[index] = ([row * width + t for t in range(first, first + len(cont))], cont)
                    at += len(rest)
                # Padding queries read themselves too: with no shared prefix they would read nothing, and
                # an all-masked query is zeros in PyTorch's CPU kernels but NaN in some others.
                pad = torch.arange(at, width)
                mask[row, 0, pad, size + pad] = True
            # In probe order whatever the packing: the same order in both layouts and in every batch size.
            where = [p for i in sorted(scored) for p in scored[i][0]]
            targets = [t for i in sorted(scored) for t in scored[i][1]]
            batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
            batches.append(
                ProbeBatch(
                    prefix=prefix,
                    inputs={k: v.to(device) for k, v in batch.items()},
                    where=torch.tensor(where, device=device),
                    targets=torch.tensor(targets),
                    inline=inline,
                )
            )
        return batches

    @torch.no_grad()
    def _logits(self, trainer, pl_module, batch: ProbeBatch) -> torch.Tensor:
        """Logits at the batch's scored positions, in the trainer's precision context (the output layer's
        dtype: :func:`drift` casts them to float32 a chunk at a time)."""
        from lit_lora.speedups.chunked_loss import position_logits

        model, inputs = pl_module.model, batch.inputs
        with trainer.precision_plugin.forward_context():
            if batch.inline:
                logits = position_logits(model, {**inputs, "shared_prefix": len(batch.prefix)}, batch.where)
            else:
                cache = None
                if batch.prefix:
                    ids = torch.tensor([batch.prefix], device=inputs["input_ids"].device)
                    out = model(input_ids=ids, use_cache=True)
                    cache = out.cache if hasattr(out, "cache") else out.past_key_values
                    cache.batch_repeat_interleave(inputs["input_ids"].shape[0])
                logits = position_logits(model, {**inputs, "cache": cache}, batch.where)
        return logits

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, float]:
        """The three metrics now (adapter on), against the base's kept answer (adapter off). The model's
        train/eval flags are restored afterwards, also on an error."""
        from lit_lora.inference.decoding import adapter_enabled, eval_mode

        model = pl_module.model
        with eval_mode(model):
            if self._base is None:  # once per run: the batches and the base's answer, timed apart
                started = time.perf_counter()
                inline = self.inline if self.inline is not None else shares_prefix(model)
                self._batches_kept = self._batches(pl_module.device, inline)
                with adapter_enabled(model, False):
                    base = self._all_logits(trainer, pl_module)
                self._base = BaseAnswer.from_logits(base, self._targets())
                self.base_pass_s = time.perf_counter() - started
            tuned = self._all_logits(trainer, pl_module)
        return drift(self._base, tuned, self._targets())

    def _all_logits(self, trainer, pl_module) -> torch.Tensor:
        """The scored positions' logits over every kept batch, on the CPU, in probe order."""
        return torch.cat([self._logits(trainer, pl_module, b).cpu() for b in self._batches_kept])

    def _targets(self) -> torch.Tensor:
        return torch.cat([b.targets for b in self._batches_kept])

    # -- Lightning hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        if not hasattr(pl_module.model, "disable_adapter") or pl_module.tokenizer is None:
            self.enabled = False
            log.warning("retention: no adapter or tokenizer on this module; the probe is off")
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            # Sharded parameters: generate() and a callback's own forward passes are not supported there yet.
            self.enabled = False
            if trainer.is_global_zero:
                print(f"lit-lora: retention probe off under {strategy}", file=sys.stderr, flush=True)
            return
        self.build_probes(pl_module, trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_started = time.perf_counter()
        self._probe_this_val = 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking or not self.sequences:
            return
        started, first = time.perf_counter(), self._base is None
        metrics = self.measure(trainer, pl_module)
        self._probe_this_val = time.perf_counter() - started
        # The recurring cost: the base's pass happens once per run and is reported on its own.
        self.probe_s.append(self._probe_this_val - (self.base_pass_s if first else 0.0))
        for name, value in metrics.items():
            # Every rank measured the same probe; sync_dist keeps Lightning from warning about it.
            pl_module.log(name, value, on_epoch=True, sync_dist=True)
        self.last = metrics
        self.history.append({"step": trainer.global_step, **metrics})
        if self.warn_kl is not None and metrics["retention/kl"] > self.warn_kl:
            line = (
                f"lit-lora: warning: step {trainer.global_step}: drift from the base, retention/kl "
                f"{metrics['retention/kl']:.3f} > warn_kl {self.warn_kl} (agreement "
                f"{100 * metrics['retention/agreement']:.1f}%)"
            )
            self.warnings.append(line)
            if trainer.is_global_zero:
                print(line, file=sys.stderr, flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_started is not None and not trainer.sanity_checking and self._probe_this_val:
            # The validation's own time, without the probe that rode on it.
            self.validation_s.append(time.perf_counter() - self._val_started - self._probe_this_val)
        self._val_started = None

    def summary_metrics(self) -> dict:
        if not self.enabled or not self.history:
            return {}
        probe = sum(self.probe_s) / len(self.probe_s)
        validation = sum(self.validation_s) / max(1, len(self.validation_s))
        return {
            **self.last,
            "retention": {
                "history": self.history,
                "warnings": self.warnings,
                "probes": len(self.sequences),
                "positions": sum(len(c) for _, c in self.sequences),
                "cache_hit": self.cache_hit,
                "base_generation_s": round(self.base_s, 2),
                "base_pass_s": round(self.base_pass_s, 3),
                "probe_s_mean": round(probe, 3),
                "validation_s_mean": round(validation, 3),
                "probe_s": [round(x, 3) for x in self.probe_s],
                "validation_s": [round(x, 3) for x in self.validation_s],
                "cost_pct_of_validation": round(100 * probe / validation, 1) if validation else None,
            },
        }
