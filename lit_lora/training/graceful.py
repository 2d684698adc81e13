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

In a single process this callback alone decides where the run stops. Lightning also notes SIGTERM and
raises its own ``SIGTERMException`` at fixed points of its loops (after each training batch, after an
epoch); a signal that lands between one of our hooks and such a point (while the logger writes its
metrics after validation, say) would stop the run there without a checkpoint. The handler therefore
clears Lightning's flag when the run has one process. With several processes Lightning's flag is what
the ranks agree on (rank zero broadcasts it every step), so it is left alone there.

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

    @staticmethod
    def slurm_requeue(trainer: L.Trainer) -> bool:
        env = trainer._accelerator_connector.cluster_environment
        return isinstance(env, SLURMEnvironment) and env.auto_requeue

    def _handler(self, signum, frame) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size == 1:
            # Lightning's own handler ran just before this one (it chains the handler it found) and set
            # the flag its loops raise SIGTERMException on; the safe points here decide instead.
            trainer._signal_connector.received_sigterm = False
        if self.requested is not None:
            return
        self.requested = signum
        global _first_signal
        _first_signal = _first_signal or signum
        print(
            f"lit-lora: received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
            f"(grace period {self.grace_period_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=self._watchdog, daemon=True).start()

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
        if not path.exists():
            trainer.save_checkpoint(
                path, weights_only=False
            )  # the full state; said, so Lightning need not log it
        self.saved = path
        raise Interrupted(
            f"{signal.Signals(self.requested).name} received: checkpoint {path} saved at step "
            f"{trainer.global_step}; continue with resume=auto"
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested is None:
            return
        boundary = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if boundary or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning raises its own SIGTERMException right after this hook at an epoch's end.
        if self.requested is not None:
            self._stop(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.requested is not None and not trainer.sanity_checking:
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        # A signal that arrives after the last validation batch (during the epoch-end hooks: metrics,
        # the retention probe) would otherwise meet Lightning's own SIGTERM check first, which stops the
        # run without a checkpoint. Validation ends at a step boundary: a safe point.
        if self.requested is not None and not trainer.sanity_checking:
            self._stop(trainer)
