"""Memory tracking: where a run's memory goes, per phase, on CUDA and on CPU.

CUDA (per rank): peak allocated / reserved / active bytes after model load, after the first training
step (activations and optimizer state appear there) and over the steady state; logged each step as
``memory/*`` and returned by :meth:`MemoryTracker.summary_metrics` for ``summary.json``, with one entry
per rank under multi-GPU. ``snapshot_at_step=N`` records allocations from the start of training and dumps
a snapshot for https://pytorch.org/memory_viz at step N.

CPU: the process's current and peak resident set size (``VmRSS`` / ``VmHWM`` from ``/proc``, else
``getrusage``). Where neither applies the tracker does nothing; it never raises.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from lit_lora.process import MB, process_memory_mb

log = logging.getLogger(__name__)


def weights_mb(module: torch.nn.Module) -> float:
    """Bytes of the module's parameters and buffers as stored (4-bit weights count as packed bytes), in MiB."""
    tensors = [*module.parameters(), *module.buffers()]
    return round(sum(t.numel() * t.element_size() for t in tensors) / MB, 1)


def cuda_memory_mb(device: torch.device) -> dict[str, float]:
    """Current and peak (since the last reset) allocated / reserved / active memory of ``device``, in MiB."""
    stats = torch.cuda.memory_stats(device)
    return {
        "allocated_mb": round(stats.get("allocated_bytes.all.current", 0) / MB, 1),
        "peak_allocated_mb": round(stats.get("allocated_bytes.all.peak", 0) / MB, 1),
        "peak_reserved_mb": round(stats.get("reserved_bytes.all.peak", 0) / MB, 1),
        "peak_active_mb": round(stats.get("active_bytes.all.peak", 0) / MB, 1),
    }


class MemoryTracker(L.Callback):
    """Logs ``memory/*`` every ``log_every_n_steps`` optimizer steps and summarises the phases."""

    def __init__(
        self, log_every_n_steps: int = 1, snapshot_at_step: int | None = None, snapshot_dir: str | None = None
    ):
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.snapshot_at_step = snapshot_at_step
        self.snapshot_dir = snapshot_dir
        self.phases: dict[str, dict[str, float]] = {}
        self.device: torch.device | None = None
        self._steady: dict[str, float] = {}
        self._recording = False
        self._per_rank: list[dict] | None = None

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _read(self) -> dict[str, float]:
        try:
            return cuda_memory_mb(self.device) if self._cuda() else process_memory_mb()
        except Exception as err:  # a tracker must never stop a run
            log.debug("memory reading failed: %s", err)
            return {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.device = pl_module.device
        self.phases["model_load"] = {**self._read(), "weights_mb": weights_mb(pl_module)}  # loaded before fit
        if self._cuda():
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.snapshot_at_step is not None and self._cuda():
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._recording = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        reading = self._read()
        if not reading:
            return
        if "first_step" not in self.phases:
            self.phases["first_step"] = reading
            if self._cuda():
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            for key, value in reading.items():
                self._steady[key] = max(self._steady.get(key, 0.0), value)
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log_dict({f"memory/{k}": v for k, v in reading.items()}, on_step=True, on_epoch=False)
        if self._recording and trainer.global_step >= self.snapshot_at_step:
            self._dump_snapshot(trainer)

    def _dump_snapshot(self, trainer: L.Trainer) -> None:
        folder = Path(self.snapshot_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"memory-snapshot-step{trainer.global_step}-rank{trainer.global_rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False
        log.info("memory snapshot written to %s (open it at https://pytorch.org/memory_viz)", path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._steady:
            self.phases["steady_state"] = dict(self._steady)
        if trainer.world_size > 1 and self.phases:
            # One row per rank: every rank contributes its own peaks (all ranks must call all_gather).
            keys = sorted({k for phase in self.phases.values() for k in phase})
            mine = torch.tensor(
                [max(p.get(k, 0.0) for p in self.phases.values()) for k in keys], device=pl_module.device
            )
            gathered = pl_module.all_gather(mine).reshape(trainer.world_size, -1).tolist()
            self._per_rank = [dict(zip(keys, row, strict=True)) for row in gathered]

    def summary_metrics(self) -> dict:
        """``{"memory": {...}}`` for summary.json: device, phases, overall peaks (and per rank)."""
        out: dict = {"device": str(self.device) if self.device else "unknown", "phases": self.phases}
        if not self._cuda():
            out.update(process_memory_mb())  # read now: the peak of the whole process so far
        else:
            out["peak_allocated_mb"] = max(
                (p.get("peak_allocated_mb", 0.0) for p in self.phases.values()), default=0.0
            )
            out["peak_reserved_mb"] = max(
                (p.get("peak_reserved_mb", 0.0) for p in self.phases.values()), default=0.0
            )
        if self._per_rank is not None:
            out["per_rank"] = self._per_rank
        return {"memory": out}
