"""How the ranks of one node are started and watched: Lightning's subprocess launcher, with three changes.

Lightning's ``_SubprocessScriptLauncher`` (``trainer=ddp``, FSDP) starts local ranks 1..N-1 as children of
rank 0 by re-running rank 0's command line. lit-lora keeps that launcher and changes what it got wrong for a
run that must stop cleanly:

1. **A dying rank.** Lightning's observer thread polls the children every 5 s and, when one exits with any
   non-zero status, SIGKILLs every process, rank 0 included, with one INFO log line: a rank that stopped
   gracefully (143, its checkpoint saved) could kill rank 0 while it finished, and a rank killed by the
   OOM killer ended the run with no word of why. :class:`RankWatch` replaces it: a child that exits with a
   status other than 0 or 143 is a lost rank; rank 0's main thread, blocked in or entering a collective
   with the dead peer, fails with a gloo error within a second and :func:`lost_rank` turns that into one
   line (exit 5, :class:`~lit_lora.errors.RankLost`); if the main thread is still busy elsewhere
   :data:`LOST_RANK_GRACE_S` later, the watch says the same line, stops the other children and ends the
   process. Checkpoints are written atomically, so the run folder stays resumable with ``resume=auto``.
2. **Sweeps.** Under ``-m`` Lightning re-ran the whole ``-m`` command line in the child (which started a
   sweep of its own) with the sweep's ``hydra.run.dir``, not the job's folder. :func:`rank_command`
   starts the child as a single run of this job: the job's own overrides and its output folder.
3. **The environment.** The launcher sets ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``... in rank 0's
   own environment and never removes them: the next job of a sweep in the same process then believed it
   had been started by torchrun and waited for ranks nobody started. :meth:`WatchedLauncher.launch` puts
   the environment (and torch's thread count) back when training returns.

The process-group timeout (``trainer.process_group_timeout_s``, torch's default of 30 minutes) bounds the
wait for a rank that is alive but stuck; a rank that has died is seen at once (its sockets close).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

# Seconds the main thread has to leave by itself (through the gloo error) after a child is seen dead,
# before the watch ends the process: a step with no collective in it (a long forward on one rank) still
# ends well within the 60 s that issue 36 allows.
LOST_RANK_GRACE_S = 15.0
POLL_S = 0.5
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
FINE = (0, 143)  # a child that completed, or stopped on a signal after its checkpoint


def describe_status(status: int) -> str:
    """``killed by SIGKILL`` for a negative Popen status, else ``exited with status N``."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def rank_command(local_rank: int) -> tuple[list[str], str | None]:
    """The command line and working directory that start local rank ``local_rank`` of this job.

    Under Hydra: ``python -m <this module> <the job's overrides> hydra.run.dir=<the job's folder>``, also
    for one job of a sweep (its overrides are that job's values, not the ``-m`` line). Otherwise the
    command line of this process, as Lightning builds it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return list(_basic_subprocess_cmd()), None
    from hydra.utils import get_original_cwd

    import __main__

    hydra = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [os.path.abspath(sys.argv[0])]
    folder = str(hydra.runtime.output_dir).replace("\\", "\\\\").replace('"', '\\"')
    return [
        sys.executable,
        *program,
        *hydra.overrides.task,
        f'hydra.run.dir="{folder}"',  # quoted: sweep folders hold '=' and ','
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # rank 0 wrote the job's .hydra folder
    ], get_original_cwd()


class RankWatch(threading.Thread):
    """Polls the ranks this process started; reports the first that ends with a status other than
    :data:`FINE` to ``on_lost(index, proc)`` (once). :meth:`stop` ends the watch (training is over)."""

    def __init__(self, procs: list[subprocess.Popen], on_lost: Callable[[int, subprocess.Popen], None]):
        super().__init__(daemon=True, name="lit-lora-rank-watch")
        self.procs = procs
        self.on_lost = on_lost
        self.lost: tuple[int, subprocess.Popen] | None = None
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(POLL_S):
            found = self.check()
            if found is not None:
                self.on_lost(*found)
                return

    def check(self) -> tuple[int, subprocess.Popen] | None:
        """The first started rank (local index, process) that has ended badly, or None; remembered."""
        if self.lost is None:
            for index, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and proc.returncode not in FINE:
                    self.lost = (index, proc)
                    break
        return self.lost

    def stop(self) -> None:
        self._stopped.set()


class WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with :class:`RankWatch` instead of its observer, the job's own
    command line for the other ranks, and rank 0's environment restored afterwards (module docstring).

    ``checkpoints`` (set by the training run): the run's checkpoint folder, whose newest complete checkpoint
    the line that reports a lost rank names (:func:`newest_checkpoint_line`, as :func:`lost_rank` does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch: RankWatch | None = None
        self.checkpoints: Path | None = None
        self.reported = threading.Lock()  # the main thread and the watch: whoever reports first

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        saved_env = {name: os.environ.get(name) for name in LAUNCH_ENV}
        threads = torch.get_num_threads()
        # Asked once: starting the ranks sets LOCAL_RANK, after which the environment says "external".
        launching = not self.cluster_environment.creates_processes_externally
        try:
            if launching:
                self._start_ranks()
                self.watch = RankWatch(self.procs, self._rank_lost)
                self.watch.start()
            _set_num_threads_if_needed(num_processes=self.num_processes)
            return function(*args, **kwargs)
        finally:
            if launching:
                for name, value in saved_env.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
                torch.set_num_threads(threads)

    def _start_ranks(self) -> None:
        """Start local ranks 1..N-1 with the environment torch.distributed reads (Lightning's variables)."""
        if self.procs:
            raise RuntimeError("the launcher starts the other ranks once")
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            command, cwd = rank_command(local_rank)
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))

    def lost_rank_line(self, index: int, proc: subprocess.Popen) -> str:
        """The line that reports local rank ``index`` as lost (the message of :class:`RankLost`)."""
        global_rank = int(os.environ.get("NODE_RANK", "0")) * self.num_processes + index
        return (
            f"rank {global_rank} (pid {proc.pid}) {describe_status(proc.returncode)} during training; the "
            f"other ranks stopped. The newest complete checkpoint is {newest_checkpoint_line(self.checkpoints)}; "
            "continue with resume=auto"
        )

    def _rank_lost(self, index: int, proc: subprocess.Popen) -> None:
        """The watch's report: give the main thread :data:`LOST_RANK_GRACE_S` to leave through the gloo
        error (it says the line, see :func:`lost_rank`); if it has not, say it here and end the process."""
        threading.Event().wait(LOST_RANK_GRACE_S)
        if not self.reported.acquire(blocking=False):
            return
        print(f"lit-lora: error: {self.lost_rank_line(index, proc)}", file=sys.stderr, flush=True)
        for other in self.procs:
            if other.poll() is None:
                other.kill()  # blocked in a collective with the dead rank: nothing left to save
        from lit_lora.errors import RankLost

        os._exit(RankLost.exit_code)


def launcher_of(trainer: Any) -> WatchedLauncher | None:
    launcher = getattr(trainer.strategy, "launcher", None)
    return launcher if isinstance(launcher, WatchedLauncher) else None


# The pid of the process that started this rank (Lightning's launcher: local rank 0), taken at import,
# before a dead parent could have been replaced by init.
_PARENT = os.getppid()


def lost_rank(trainer: Any, err: BaseException, checkpoints: Path) -> str | None:
    """The line that reports a lost rank when ``err`` (raised by ``Trainer.fit`` with several processes)
    comes from one; None for any other failure. ``checkpoints``: the run's checkpoint folder.

    A rank this process started that has ended badly is named with its status; otherwise a collective
    error (gloo: connection closed or reset by the peer, a timeout) is reported as the loss of another
    rank, or of the process that started this one when it has gone."""
    launcher = launcher_of(trainer)
    if launcher is not None and launcher.watch is not None:
        for _ in range(int(3 / POLL_S)):  # the child's death may reach us a moment after its sockets closed
            found = launcher.watch.check()
            if found is not None:
                if not launcher.reported.acquire(blocking=False):
                    threading.Event().wait(LOST_RANK_GRACE_S)  # the watch said it and is ending the process
                return launcher.lost_rank_line(*found)
            if not _collective_failure(err):
                return None
            threading.Event().wait(POLL_S)
        launcher.reported.acquire(blocking=False)
    if not _collective_failure(err):
        return None
    first = _first_words(err)
    # Started by Lightning's launcher, the parent is local rank 0 (under torchrun, its agent).
    gone = os.environ.get("LOCAL_RANK", "0") != "0" and os.getppid() != _PARENT
    who = f"the process that started this one (pid {_PARENT}) has exited" if gone else "another rank was lost"
    return (
        f"rank {trainer.global_rank}: {who} ({first}). The newest complete checkpoint is "
        f"{newest_checkpoint_line(checkpoints)}; continue with resume=auto"
    )


def _first_words(err: BaseException) -> str:
    """The gist of a collective's error: gloo's ``[.../pair.cc:537] Read error [127.0.0.1]:51855: Connection
    reset by peer. This is typically caused by...`` becomes ``Read error [127.0.0.1]:51855: Connection reset
    by peer``."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ", 1)[0][:300]


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because a peer died or hung (torch's distributed
    errors; gloo's transport errors are plain RuntimeErrors that name gloo's pair or a peer)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(err, dist_error):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text
        for marker in ("Connection closed by peer", "Connection reset by peer", "gloo/transport", "Timed out")
    )


def newest_checkpoint_line(folder: Path | None) -> str:
    """``<path> (step N)`` of the newest complete checkpoint in ``folder``, ``none yet``, or ``unknown``
    without a folder."""
    from lit_lora.training.checkpoint_io import checkpoint_step, find_resumable

    if folder is None:
        return "unknown"
    found = find_resumable(folder)
    return "none yet" if found is None else f"{found} (step {checkpoint_step(found)})"
