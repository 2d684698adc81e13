"""Progress that reads well on a terminal and in a log file.

On a terminal, training shows Lightning's rich progress bar counting optimizer steps
(:class:`StepProgressBar`: ``step 40/100 · epoch 0``). When stdout is not a terminal (``make train >
log``, nohup, SLURM, CI) a bar cannot redraw, so :class:`ProgressLines` prints one plain line every
``trainer.log_every_n_steps`` steps or every 30 s, whichever comes first, and :func:`progress` does
the same for other long loops (held-out generation). Lines go to stdout from rank zero only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

INTERVAL_S = 30.0


def interactive() -> bool:
    """Whether stdout is a terminal (a bar can redraw in place)."""
    return sys.stdout.isatty()


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _say(line: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"lit-lora: {line}", flush=True)


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps towards ``trainer.max_steps``: its own header read
    ``Epoch 0/-2`` under ``max_epochs=-1`` and its total was one epoch's batches, not the run's steps."""

    @property
    def total_train_batches(self) -> int | float:
        steps = self.trainer.max_steps
        return steps if steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        steps = self.trainer.max_steps
        if steps > 0:
            return f"step {self.trainer.global_step}/{steps} · epoch {current_epoch}"
        return f"epoch {current_epoch}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps > 0 and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id,
                completed=trainer.global_step,
                description=self._get_train_description(trainer.current_epoch),
            )


class ProgressLines(L.Callback):
    """One line of training progress every ``every_n_steps`` optimizer steps or ``interval_s`` seconds,
    whichever comes first: step / max_steps, epoch, the last logged loss, tokens/s since the start,
    elapsed time and ETA."""

    def __init__(self, every_n_steps: int, interval_s: float = INTERVAL_S):
        self.every_n_steps = max(1, every_n_steps)
        self.interval_s = interval_s
        self._started = self._last_time = 0.0
        self._first_step = self._last_step = 0
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last_time = time.monotonic()
        self._first_step = self._last_step = trainer.global_step
        self._tokens = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        mask = batch.get("token_mask") if isinstance(batch, dict) else None
        if mask is not None:
            self._tokens += int(mask.sum())
        elif isinstance(batch, dict) and "token_counts" in batch:  # GRPO: prompt + completion tokens
            self._tokens += int(batch["token_counts"][0])
        step, now = trainer.global_step, time.monotonic()
        due = step - self._last_step >= self.every_n_steps or now - self._last_time >= self.interval_s
        if step == self._last_step or not (due or step == trainer.max_steps):
            return
        self._last_step, self._last_time = step, now
        _say(self.line(trainer, step, now - self._started))

    def line(self, trainer: L.Trainer, step: int, elapsed: float) -> str:
        """``step 40/100 (epoch 0), loss 1.2345, 412 tokens/s, elapsed 1m32s, ETA 2m18s``."""
        total = trainer.max_steps if trainer.max_steps > 0 else None
        parts = [f"step {step}/{total or '?'} (epoch {trainer.current_epoch})"]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        reward = trainer.callback_metrics.get("train/reward")  # GRPO
        if reward is not None:
            parts.append(f"reward {float(reward):.3f}")
        if elapsed > 0:
            parts.append(f"{self._tokens / elapsed:.0f} tokens/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._first_step
        if total and done > 0:
            parts.append(f"ETA {_clock(elapsed / done * (total - step))}")
        return ", ".join(parts)


def progress(items: Iterable[Any], total: int, desc: str, unit: str = "batches") -> Iterator[Any]:
    """``items`` with progress: a tqdm bar on a terminal; otherwise a plain line every 30 s and at the end."""
    if interactive():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit.removesuffix("es"), leave=False)
        return
    started = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= INTERVAL_S or done == total:
            last = now
            _say(f"{desc}: {done}/{total} {unit}, elapsed {_clock(now - started)}")
