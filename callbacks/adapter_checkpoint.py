"""Adapter-only checkpoints that resume exactly: Lightning's ModelCheckpoint plus the RNG streams.

What is saved and how is the work of :class:`lit_lora.training.checkpoint_io.SafetensorsCheckpointIO` (folders
of safetensors + JSON, atomic) and :meth:`lit_lora.training.module.LitLoRA.on_save_checkpoint` (the adapter
instead of the frozen base). Top-k by a monitored metric, ``last``, and saving every N steps or at
validation are ModelCheckpoint's own options.

This subclass adds what exact resumption needs and Lightning does not save: the torch (and CUDA), numpy
and Python RNG states (dropout draws from them), of every rank: ``rng_states_per_rank`` lists them by
global rank (gathered from all ranks when the checkpoint is written, a collective every rank takes part
in, as in every save); checkpoints of older versions hold ``rng_states``, rank 0's alone. On resume each rank restores its own just before the first training batch, which is the point at
which an uninterrupted run would continue with the same states. A checkpoint written by another number
of processes, or by a lit-lora without the per-rank list, gives every rank the states it holds
(rank 0's), with one line saying so: the run resumes, but dropout draws other masks on the other ranks
than an uninterrupted run would.

``monitor`` may also be a weighted sum of logged metrics, for example ``val/loss + 2 * retention/kl``
(keep the checkpoint that learned the task while drifting least from the base): terms joined by `` + ``
or `` - `` (spaces around), each a metric name, optionally times a number.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_METRIC = r"[A-Za-z_][A-Za-z0-9_./-]*"
_TERM = re.compile(rf"^(?:({_NUMBER})\s*\*\s*)?({_METRIC})(?:\s*\*\s*({_NUMBER}))?$")


def parse_criterion(text: str) -> list[tuple[float, str]] | None:
    """``[(weight, metric), ...]`` of a weighted sum such as ``val/loss + 0.5 * retention/kl``; None for
    a plain metric name. Raises :class:`~lit_lora.errors.UserError` for a sum it cannot read."""
    from lit_lora.errors import UserError

    parts = re.split(r"\s+([+-])\s+", text.strip())
    if len(parts) == 1 and "*" not in text:
        return None
    terms, sign = [], 1.0
    for i, part in enumerate(parts):
        if i % 2:
            sign = 1.0 if part == "+" else -1.0
            continue
        match = _TERM.match(part.strip())
        if not match or (match.group(1) and match.group(3)):
            raise UserError(
                f"callbacks.adapter_checkpoint.monitor={text!r}: {part.strip()!r} is not a metric or "
                "number * metric (write sums as 'val/loss + 0.5 * retention/kl', spaces around + and -)"
            )
        weight = float(match.group(1) or match.group(3) or 1.0)
        terms.append((sign * weight, match.group(2)))
    return terms


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose checkpoints also carry the RNG states, restored on resume.

    Defaults: folders named ``step-<NNNNNN>.ckpt`` (no metric in the name, so ``resume=auto`` can read the
    step from the folder itself), ``last.ckpt`` kept up to date.
    """

    def __init__(self, filename: str = "step-{step:06d}", save_last: bool = True, **kwargs: Any):
        super().__init__(filename=filename, save_last=save_last, auto_insert_metric_name=False, **kwargs)
        self._rng_to_restore: dict[str, Any] | None = None
        self.criterion = parse_criterion(self.monitor) if self.monitor else None

    def _monitor_candidates(self, trainer) -> dict[str, torch.Tensor]:
        """Lightning's candidates, plus the value of a weighted-sum ``monitor`` once all its terms exist."""
        candidates = super()._monitor_candidates(trainer)
        if self.criterion and all(name in candidates for _, name in self.criterion):
            total = sum(w * candidates[name].detach().float().cpu() for w, name in self.criterion)
            candidates[self.monitor] = torch.as_tensor(total)
        return candidates

    def state_dict(self) -> dict[str, Any]:
        own = _collect_rng_states(include_cuda=True)
        per_rank = [own]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, own)  # every rank saves (Lightning's dump runs on each)
        # Rank 0's states are per_rank[0]; older lit-lora versions wrote them as "rng_states" (read below).
        return {**super().state_dict(), "rng_states_per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        per_rank = state.pop("rng_states_per_rank", None)
        own = state.pop("rng_states", None)  # older versions: rank 0's states alone
        self._rng_to_restore = {
            "own": own if own is not None or not per_rank else per_rank[0],
            "per_rank": per_rank,
        }
        super().load_state_dict(state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._rng_to_restore is None:
            return
        saved, self._rng_to_restore = self._rng_to_restore, None
        states, note = rank_rng_states(
            saved["own"], saved["per_rank"], trainer.global_rank, trainer.world_size
        )
        if note and trainer.is_global_zero:
            print(f"lit-lora: note: {note}", file=sys.stderr, flush=True)
        if states is not None:
            _set_rng_states(states)


def rank_rng_states(
    own: dict | None, per_rank: list | None, rank: int, world_size: int
) -> tuple[dict | None, str | None]:
    """``(states, note)``: the RNG states rank ``rank`` of ``world_size`` restores from a checkpoint that
    holds ``own`` (the writing rank's, rank 0's in the file) and ``per_rank`` (one per rank, or None in
    checkpoints of older lit-lora versions); ``note`` says why a rank gets states that are not its own."""
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank], None
    if own is None:
        return None, "the checkpoint holds no RNG states: dropout masks start from the seed's streams"
    if per_rank is None:
        if world_size == 1:  # an older one-process checkpoint: its states are this rank's
            return own, None
        return own, (
            "the checkpoint holds rank 0's RNG states only (written by an older lit-lora): every rank "
            "continues from them, so dropout masks on the other ranks differ from an uninterrupted run"
        )
    return own, (
        f"the checkpoint was written by {len(per_rank)} process(es), this run has {world_size}: every "
        "rank continues from rank 0's RNG states"
    )
