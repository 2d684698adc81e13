"""Facts about the process and the machine it runs on, with no lit-lora imports (anything may use them).

- :func:`local_rank`: this process's device index on its node (torchrun, SLURM, Lightning's launcher);
- :func:`hub_host` / :func:`hub_reachable`: whether the Hugging Face hub answers, in seconds (one TCP
  connection, :func:`tcp_reachable`), where transformers' own retries take half a minute;
- :func:`process_memory_mb` / :func:`reset_peak_rss`: this process's resident memory and its peak.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

HUB_TIMEOUT_S = 5.0


def local_rank() -> int:
    """This process's device index on its node (torchrun, SLURM, or Lightning's own launcher)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def hub_host() -> str:
    """The host name of the hub (``HF_ENDPOINT`` or huggingface.co)."""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """One TCP connection attempt to the hub; False at once under ``HF_HUB_OFFLINE``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return tcp_reachable(hub_host(), 443, timeout)


def tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """Whether one TCP connection to ``host:port`` opens within ``timeout`` seconds, name lookup included.

    ``create_connection``'s timeout covers the connect only; an offline machine whose resolver does not
    answer would spend its own 10-30 s in the lookup, so the attempt runs in a thread that is waited
    for ``timeout`` seconds at most (a late thread is a daemon and ends with its lookup)."""
    opened: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, name="lit-lora-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


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
