"""Training speed, counted from the batches themselves: tokens/s (all and trained), samples/s, step
time and, where the device's peak is known (CUDA), model FLOPs utilisation."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


def flops_per_token(total_params: int, trainable_params: int) -> int:
    """Training FLOPs per token of a LoRA model (attention scores left out).

    Forward 2N; backward 2N for the activation gradients through every (frozen) weight, plus 2 per
    trainable parameter for its weight gradient: 4N + 2N_trainable, where full fine-tuning costs 6N.
    """
    return 4 * total_params + 2 * trainable_params


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (non-padding tokens), ``perf/trained_tokens_per_s`` (tokens with a
    label), ``perf/samples_per_s``, ``perf/step_time_s`` and, on CUDA, ``perf/mfu``.

    The first ``warmup_steps`` optimizer steps are left out of the steady-state figures (allocator and
    kernel warm-up); validation time is left out too.
    """

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.trained = self.samples = 0
        self.steady_tokens = self.steady_trained = self.steady_samples = self.steady_steps = 0
        self.start = self.steady_start = None
        self.steady_end = None
        self.val_started = None
        self.last_batch_end = None
        self.peak_flops: float | None = None
        self.flops_per_token = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.start = self.last_batch_end = time.perf_counter()
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self.flops_per_token = flops_per_token(total, trainable)
        if pl_module.device.type == "cuda":
            dtype = (
                torch.bfloat16
                if "bf16" in str(trainer.precision)
                else torch.float16
                if "16" in str(trainer.precision)
                else torch.float32
            )
            self.peak_flops = get_available_flops(pl_module.device, dtype)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation is not training throughput: shift the clocks past the time it took.
        if self.val_started is not None:
            spent = time.perf_counter() - self.val_started
            if self.steady_start is not None:
                self.steady_start += spent
            if self.last_batch_end is not None:
                self.last_batch_end += spent
        self.val_started = None

    def on_train_batch_end(
        self, trainer, pl_module, outputs, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        tokens = int(batch["token_mask"].sum())
        trained = int((batch["labels"][:, 1:] != -100).sum())
        # A packed row holds several examples: count the examples (position resets), not the rows.
        samples = (
            int((batch["position_ids"] == 0).logical_and(batch["token_mask"].bool()).sum())
            if "position_ids" in batch
            else int(batch["input_ids"].shape[0])
        )
        self.tokens += tokens
        self.trained += trained
        self.samples += samples
        now = time.perf_counter()
        step_time = now - (self.last_batch_end or now)
        self.last_batch_end = now
        if trainer.global_step < self.warmup_steps:
            self.steady_start = now
            return
        self.steady_tokens += tokens
        self.steady_trained += trained
        self.steady_samples += samples
        self.steady_steps += 1
        self.steady_end = now
        elapsed = now - (self.steady_start or self.start)
        if elapsed > 0:
            rates = {
                "perf/tokens_per_s": self.steady_tokens / elapsed,
                "perf/trained_tokens_per_s": self.steady_trained / elapsed,
                "perf/samples_per_s": self.steady_samples / elapsed,
                "perf/step_time_s": step_time,
            }
            if self.peak_flops:
                rates["perf/mfu"] = self.flops_per_token * self.steady_tokens / elapsed / self.peak_flops
            pl_module.log_dict(rates, on_step=True, on_epoch=False)

    def summary_metrics(self) -> dict:
        if self.start is None:
            return {}
        out = {"train_tokens": self.tokens, "trained_tokens": self.trained, "train_samples": self.samples}
        if (
            self.steady_end is not None
            and self.steady_start is not None
            and self.steady_end > self.steady_start
        ):
            elapsed = self.steady_end - self.steady_start
            out["tokens_per_s"] = round(self.steady_tokens / elapsed, 1)
            out["trained_tokens_per_s"] = round(self.steady_trained / elapsed, 1)
            out["samples_per_s"] = round(self.steady_samples / elapsed, 2)
            out["step_time_s"] = round(elapsed / max(self.steady_steps, 1), 3)
            out["flops_per_token"] = self.flops_per_token
            if self.peak_flops:
                out["mfu"] = round(self.flops_per_token * self.steady_tokens / elapsed / self.peak_flops, 4)
        return out
