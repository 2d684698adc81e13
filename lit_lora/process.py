"""Facts about this process, with no lit-lora imports (anything may use them): :func:`local_rank`, its
device index on its node, and its resident memory (:func:`process_memory_mb`, :func:`reset_peak_rss`)."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def local_rank() -> int:
    """This process's device index on its node (torchrun, SLURM, or Lightning's own launcher)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


MB = 1024 * 1024


def process_memory_mb() -> dict[str, float]:
    """Current and peak resident memory of this process, in MiB (``rss_mb``, ``peak_rss_mb``)."""
    values: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(rest.split()[0]) / 1024  # kB
    except OSError:
        pass
    if "peak_rss_mb" not in values:  # not Linux: ru_maxrss is in KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values["peak_rss_mb"] = peak / MB if sys.platform == "darwin" else peak / 1024
    return {k: round(v, 1) for k, v in values.items()}


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: ``/proc/self/clear_refs``); False elsewhere.

    Jobs of a sweep run one after another in one process: without this, a job's peak would be the
    largest of all jobs before it.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
