"""Fault injection for the reliability tests; inert unless ``LIT_LORA_FAULTS`` is set.

``LIT_LORA_FAULTS`` is a comma-separated list, read once per process:

- ``nan_loss@N``: the training loss of global step N becomes NaN;
- ``inf_grad@N``: one adapter gradient element becomes +inf before the optimizer step of step N;
- ``slow_save=S``: every checkpoint write sleeps S seconds half way (so that a kill lands inside it);
- ``slow_val=S``: every validation batch sleeps S seconds (so that a signal lands inside validation);
- ``enospc_save@K``: the K-th checkpoint write of the process fails half way with ``ENOSPC``;
- ``oom@N``: the forward pass of global step N raises ``torch.OutOfMemoryError``;
- ``sigterm@N``: the process sends itself SIGTERM after step N's batch hooks (callbacks' first);
- ``sigterm_after_fit@N``: the same once a fit that ended at step N is over (during held-out scoring);
- ``sigkill@N``: the process kills itself (SIGKILL: no handler, no cleanup) after step N's batch hooks.

A name may repeat with several steps (``nan_loss@3,nan_loss@4``).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time

ENV = "LIT_LORA_FAULTS"


@functools.cache
def _faults() -> tuple[dict[str, set[int]], dict[str, float]]:
    at: dict[str, set[int]] = {}
    values: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in os.environ.get(ENV, "").split(","))):
        if "@" in item:
            name, step = item.split("@", 1)
            at.setdefault(name, set()).add(int(step))
        elif "=" in item:
            name, value = item.split("=", 1)
            values[name] = float(value)
    return at, values


def at(name: str, step: int) -> bool:
    """True when fault ``name`` is set for ``step``."""
    return step in _faults()[0].get(name, ())


_saves = 0


def during_save() -> None:
    """Called by the checkpoint writer between its files."""
    global _saves
    _saves += 1
    delay = _faults()[1].get("slow_save")
    if delay:
        time.sleep(delay)
    if at("enospc_save", _saves):
        raise OSError(errno.ENOSPC, "No space left on device (injected by LIT_LORA_FAULTS)")


def during_validation() -> None:
    """Called by each validation step."""
    delay = _faults()[1].get("slow_val")
    if delay:
        time.sleep(delay)


def signal_self_after(name: str, step: int) -> None:
    """Send this process SIGTERM when fault ``name`` is set for ``step`` (once per step)."""
    if at(name, step) and (name, step) not in _signalled:
        _signalled.add((name, step))
        os.kill(os.getpid(), signal.SIGTERM)


_signalled: set[tuple[str, int]] = set()


def kill_self_after(name: str, step: int) -> None:
    """SIGKILL this process when fault ``name`` is set for ``step``: it ends at once, as a lost node would."""
    if at(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
