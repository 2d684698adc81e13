"""Tokens per second of training, counted from the batches themselves."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (non-padding tokens) and ``perf/trained_tokens_per_s`` (tokens with a label).

    The first ``warmup_steps`` optimizer steps are left out of the steady-state figure (allocator and
    kernel warm-up); the summary also reports the whole-run average.
    """

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.trained = 0
        self.steady_tokens = self.steady_trained = 0
        self.start = self.steady_start = None
        self.steady_end = None
        self.val_started = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation is not training throughput: shift the clocks past the time it took.
        if self.val_started is not None and self.steady_start is not None:
            self.steady_start += time.perf_counter() - self.val_started
        self.val_started = None

    def on_train_batch_end(
        self, trainer, pl_module, outputs, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        tokens = int(batch["token_mask"].sum())
        trained = int((batch["labels"][:, 1:] != -100).sum())
        self.tokens += tokens
        self.trained += trained
        now = time.perf_counter()
        if trainer.global_step < self.warmup_steps:
            self.steady_start = now
            return
        self.steady_tokens += tokens
        self.steady_trained += trained
        self.steady_end = now
        elapsed = now - (self.steady_start or self.start)
        if elapsed > 0:
            rates = {
                "perf/tokens_per_s": self.steady_tokens / elapsed,
                "perf/trained_tokens_per_s": self.steady_trained / elapsed,
            }
            pl_module.log_dict(rates, on_step=True, on_epoch=False)

    def summary_metrics(self) -> dict:
        if self.start is None:
            return {}
        out = {"train_tokens": self.tokens, "trained_tokens": self.trained}
        if (
            self.steady_end is not None
            and self.steady_start is not None
            and self.steady_end > self.steady_start
        ):
            elapsed = self.steady_end - self.steady_start
            out["tokens_per_s"] = round(self.steady_tokens / elapsed, 1)
            out["trained_tokens_per_s"] = round(self.steady_trained / elapsed, 1)
        return out
