"""Make each process of a run report the native threads still alive as its interpreter starts to exit.

Issue 17: a DDP run on CPU could abort at exit (``terminate called without an active exception``,
status -6) because the gloo process group was destroyed only during interpreter finalization, with its
threads still running (see :mod:`lit_lora.training.distributed`). The abort is a race, but its cause shows in
every run: a process-group thread (gloo workers, gloo's socket loop, the TCPStore server) alive when the
interpreter starts to exit. :func:`reporting_env` puts a ``sitecustomize`` on ``PYTHONPATH`` that prints
those names; :func:`thread_reports` reads them back from the run's stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

# Thread names torch 2.x gives the process group's native threads (c10::setThreadName).
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")
REPORT = "lit-lora-test: native threads at exit:"

# Loaded by every rank at interpreter start (site imports ``sitecustomize`` from PYTHONPATH). The atexit
# handler registered first runs last, i.e. after lit-lora and Lightning are done and just before
# finalization: what is alive then would still be running while the interpreter is torn down.
SITECUSTOMIZE = f"""
import atexit, os, sys

def _report():
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{{tid}}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # the thread ended while we listed
    print("{REPORT}", os.environ.get("LOCAL_RANK", "0"), ",".join(names), file=sys.stderr, flush=True)

atexit.register(_report)
"""


def reporting_env(folder: Path) -> dict[str, str]:
    """``os.environ`` with a reporting ``sitecustomize`` (written into ``folder``) first on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def thread_reports(stderr: str) -> dict[str, list[str]]:
    """Rank (as printed) -> names of the threads alive at its exit, from a run's stderr."""
    reports = {}
    for line in stderr.splitlines():
        if line.startswith(REPORT):
            rank, names = line[len(REPORT) :].split()
            reports[rank] = names.split(",")
    return reports


def exit_problems(done) -> list[str]:
    """What is wrong with how a finished 2-process run ended (empty when it ended cleanly)."""
    reports = thread_reports(done.stderr)
    leftover = {rank: [n for n in names if n in GROUP_THREADS] for rank, names in reports.items()}
    problems = []
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    if "terminate called" in done.stderr:
        problems.append("'terminate called' in stderr")
    if sorted(reports) != ["0", "1"]:
        problems.append(f"thread reports from ranks {sorted(reports)}, expected 0 and 1")
    if any(leftover.values()):
        problems.append(f"process-group threads alive at exit: {leftover}")
    return problems
