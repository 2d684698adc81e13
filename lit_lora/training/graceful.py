"""Stop on SIGTERM / SIGUSR1 with a complete checkpoint, within a grace period.

Clusters and preemptible machines send SIGTERM (SLURM: SIGUSR1 or SIGTERM some time before the
kill). :class:`GracefulStop` notes the signal and, at the next safe point, saves a checkpoint where
``resume=auto`` finds it and ends the run with :class:`~lit_lora.errors.Interrupted` (exit 143):

- in training, after the optimizer step in progress (never between the micro-batches of an
  accumulated step: the checkpoint's data position and loop counters stay on a step boundary);
- in validation, after the current validation batch;
- a save in progress finishes first (the handler only sets a flag).

If no safe point comes within ``grace_period_s`` (a step longer than the grace period), a watchdog
ends the process with status 143; the previous checkpoint is intact. Under SLURM with Lightning's
auto-requeue, SIGUSR1 is left to Lightning (it saves and runs ``scontrol requeue``).

This callback alone decides where the run stops, with one process or several. Lightning also has a
SIGTERM handler: it forwards the signal to the ranks it started, broadcasts from rank 0 *inside the
handler* (with a signal to rank 1 alone, that broadcast meets no partner and the run hangs), and its
loops raise their own ``SIGTERMException`` at fixed points (a signal between one of our hooks and such
a point would stop the run there without a checkpoint). :meth:`setup` replaces that handler with one
that does nothing, so no collective ever runs in a signal handler and Lightning's flag stays down.

With several processes the ranks agree at each safe point, outside any handler: one all-reduce (MAX)
of the signal each rank received (0: none), so a signal to any rank, several or all stops every rank
at the same step boundary; the ranks then write one checkpoint of that step together and each exits
with status 143. The all-reduce runs once per optimizer step and once per validation batch, at points
every rank reaches in the same order.

The handler is installed before the model is built (:meth:`install`), so a signal that arrives while
the model loads is kept and honoured at the first step boundary instead of killing the process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

from lit_lora.errors import Interrupted

_first_signal: int | None = None  # the first signal a GracefulStop of this process took


def signal_received() -> int | None:
    """The first SIGTERM / SIGUSR1 any :class:`GracefulStop` of this process took, or None. A sweep
    (several jobs in one process) asks it after each job: a signal that came after a job's last safe
    point left that job complete, and ends the sweep."""
    return _first_signal


class GracefulStop(L.Callback):
    def __init__(self, checkpoint_dir: Path, grace_period_s: float = 120.0):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.grace_period_s = grace_period_s
        self.requested: int | None = None
        self.saved: Path | None = None
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, object] = {}

    def install(self, sigusr1: bool = True) -> None:
        """Register the handlers (before ``Trainer.fit``; Lightning chains its own SIGTERM one).

        Called first with ``sigusr1=False`` before the model is built, then once the trainer exists
        with ``sigusr1=not slurm_requeue(trainer)``: under SLURM auto-requeue SIGUSR1 is Lightning's.
        The handlers found the first time are put back by :meth:`uninstall`."""
        signals = [signal.SIGTERM] + ([signal.SIGUSR1] if sigusr1 else [])
        for signum in signals:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)

    def uninstall(self) -> None:
        """Put back the handlers found by :meth:`install` (a sweep runs its next job in this process).

        A signal already received keeps its watchdog: the process still ends within the grace period."""
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer, pl_module, stage) -> None:
        self._trainer = trainer
        # Lightning registers its SIGTERM handler after the setup hooks, from this attribute: ours leaves
        # the stop to the safe points below (see the module docstring).
        trainer._signal_connector._sigterm_notifier_fn = _leave_to_graceful_stop

    @staticmethod
    def slurm_requeue(trainer: L.Trainer) -> bool:
        env = trainer._accelerator_connector.cluster_environment
        return isinstance(env, SLURMEnvironment) and env.auto_requeue

    def _handler(self, signum, frame) -> None:
        # Only flags here: no collective, no I/O but one line (the safe points act on it).
        if self.requested is not None:
            return
        self._request(signum, f"received {signal.Signals(signum).name}")

    def _request(self, signum: int, why: str) -> None:
        """Note the stop (the first one counts) and start the grace-period watchdog."""
        self.requested = signum
        global _first_signal
        _first_signal = _first_signal or signum
        rank = (
            self._trainer.global_rank if self._trainer is not None and self._trainer.world_size > 1 else None
        )
        print(
            f"lit-lora: {'' if rank is None else f'rank {rank}: '}{why}: saving a checkpoint at the next "
            f"step boundary (grace period {self.grace_period_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        """Whether any rank has a stop request; with several processes, one all-reduce that every rank
        calls at the same point (never from a signal handler). A rank without a signal of its own takes
        the agreed one and starts its watchdog too."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.requested is not None
        flag = torch.tensor([self.requested or 0], dtype=torch.int32, device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        if agreed and self.requested is None:
            self._request(agreed, f"another rank received {signal.Signals(agreed).name}")
        return agreed != 0

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace_period_s)
        if self.saved is None:
            print(
                f"lit-lora: grace period of {self.grace_period_s:.0f} s over before a safe point; exiting "
                "(the previous checkpoint is intact)",
                file=sys.stderr,
                flush=True,
            )
            os._exit(Interrupted.exit_code)

    def _stop(self, trainer: L.Trainer) -> None:
        path = self.checkpoint_dir / f"step-{trainer.global_step:06d}.ckpt"
        exists = path.exists()
        if trainer.world_size > 1:  # every rank must take the same branch: saving is collective
            exists = trainer.strategy.broadcast(exists, src=0)
        if not exists:
            trainer.save_checkpoint(
                path, weights_only=False
            )  # the full state; said, so Lightning need not log it
        self.saved = path
        raise Interrupted(
            f"{signal.Signals(self.requested).name} received: checkpoint {path} saved at step "
            f"{trainer.global_step}; continue with resume=auto"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if (boundary or last) and self._stop_agreed(trainer):  # every rank has the same boundaries
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._stop_agreed(trainer):
            self._stop(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking and self._stop_agreed(trainer):
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # A signal that arrives after the last validation batch (during the epoch-end hooks: metrics,
        # the retention probe) is honoured here: validation ends at a step boundary, a safe point.
        if not trainer.sanity_checking and self._stop_agreed(trainer):
            self._stop(trainer)


def _leave_to_graceful_stop(signum, frame) -> None:
    """Lightning's SIGTERM handler, replaced (:meth:`GracefulStop.setup`): GracefulStop's own handler,
    chained after it, notes the signal."""
