"""Ordered shutdown of a multi-process run: the process group is torn down before the interpreter exits.

Why this module exists (issue 17): a 2-process gloo run could end with ``terminate called without an
active exception`` and status -6 (SIGABRT) after training had finished. Lightning never shuts a gloo
process group down: ``DDPStrategy.teardown`` unwraps the model and leaves the group alone, and the only
destroy Lightning schedules is an ``atexit`` handler registered for NCCL alone
(``lightning.fabric.utilities.distributed._init_dist_connection``: ``if torch_distributed_backend ==
"nccl": atexit.register(_destroy_dist_connection)``). The group stayed referenced by
``torch.distributed``'s module state until the interpreter cleared its modules.

So the group was destroyed inside ``Py_FinalizeEx`` (gdb: ``~ProcessGroupGloo`` called from
``finalize_modules``) with its native threads still running: two gloo workers (``pt_gloo_runloop``),
gloo's socket loop (``gloo_tcp_loop``) and, on rank 0, the TCPStore server (``pt_tcpstore_uv``), while the
peer rank was exiting too. Native threads still at work while the interpreter is torn down are the known
source of this abort: once finalization has begun, CPython ends any other thread that asks for the GIL
with ``pthread_exit``, and when that forced unwind reaches a ``noexcept`` C++ frame (a destructor
releasing a tensor that holds a Python object, for instance), libstdc++ calls ``std::terminate`` with no
exception in flight, which prints exactly that message; pytorch/pytorch#179291 describes it for gloo
groups left to finalization. Whether a thread is inside such a window at that moment depends on
scheduling, hence a rare failure. What the fix guarantees, and ``tests/training/test_ddp_shutdown.py`` checks on
every rank of every run, is that no process-group thread is alive when the interpreter starts to exit.

The fix is an ordered teardown while the interpreter is fully alive: :func:`end_process_group` after
``Trainer.fit`` on every rank, then :func:`wait_for_launched_ranks` on the rank that started the others.

``destroy_process_group`` only frees a gloo group (and joins its threads) once nothing else references
it. One such reference is easy to create by accident: ``torch.distributed.nn.functional`` (which
Lightning's ``all_gather`` uses) takes ``group=group.WORLD`` as a default argument of ten functions,
evaluated when it is first imported; imported after the group exists, it keeps that group alive until
interpreter finalization, whatever is destroyed. Lightning's own imports load it early today; this
module imports it too (``lit_lora.training.run`` imports this module before any group exists) so that the
teardown does not depend on that.
"""

from __future__ import annotations

import gc
import subprocess
from collections.abc import Callable

import torch.distributed as dist

from lit_lora.errors import RankLost

# Imported here, before any process group exists, on purpose: imported after one exists, its functions'
# default ``group=group.WORLD`` arguments would keep that group alive until interpreter finalization
# (see the module docstring). Imported now, those defaults are None, which means the default group.
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401

# A rank that has passed the closing barrier only has to leave train() and exit.
LAUNCHED_RANK_EXIT_TIMEOUT_S = 300.0


class RankFailed(RankLost):
    """A rank started by this process failed or did not exit after training ended (exit status 5, one
    line: the run's adapter is saved, but that rank's end is not known to be clean)."""


def end_process_group(completed: bool, barrier: Callable[[], object] | None = None) -> bool:
    """Tear down this process's default process group, if one is initialized; returns whether it did.

    ``completed=True``: every rank reached this point after the same work, so ``barrier`` comes first
    (the strategy's own, which picks the device for NCCL; ``torch.distributed.barrier`` by default): no
    rank closes its connections while a peer may still be finishing the last collective. Call it on
    every rank, with nothing collective left to do afterwards.

    ``completed=False`` (this rank failed): no barrier, which could wait for the group's timeout when a
    peer is dead or stuck; the group is destroyed at once, which also closes this rank's connections, so
    a peer blocked on it fails now instead of after the timeout.

    After this returns, the group's worker threads, socket loop and (on rank 0) TCPStore server have
    been joined, unless some other object still holds the group (a live ``DistributedDataParallel``
    wrapper, for instance): those references must be gone by then, as they are after ``Trainer.fit``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        if completed:
            (barrier or dist.barrier)()
    finally:
        dist.destroy_process_group()
        # Objects in reference cycles may still hold the group; collect them now, while every thread
        # may still take the GIL, rather than during interpreter finalization.
        gc.collect()
    return True


def launched_ranks(trainer) -> list[subprocess.Popen]:
    """The rank processes that this process started through Lightning's subprocess launcher ([] if none:
    one device, torchrun, SLURM, or a rank other than local rank zero)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def wait_for_launched_ranks(trainer, timeout_s: float = LAUNCHED_RANK_EXIT_TIMEOUT_S) -> None:
    """Wait until every rank this process started has exited; raise :class:`RankFailed` if one failed.

    Lightning's launcher starts ranks 1..N-1 as children of rank zero and never waits for them, so rank
    zero's exit status (the one a shell, a sweep or SLURM sees) said nothing about the others: a rank
    that failed while shutting down went unnoticed. Call this on success only, after
    :func:`end_process_group`: the other ranks have passed the closing barrier and are only exiting.
    """
    for index, proc in enumerate(launched_ranks(trainer), start=1):
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise RankFailed(
                f"local rank {index} (pid {proc.pid}) had not exited {timeout_s:.0f} s after training ended"
            ) from err
        if status != 0:
            raise RankFailed(
                f"local rank {index} (pid {proc.pid}) exited with status {status} after training ended"
            )
