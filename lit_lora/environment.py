"""Facts about the process and the machine it runs on, with no lit-lora imports (anything may use them).

- :func:`local_rank`: this process's device index on its node (torchrun, SLURM, Lightning's launcher);
- :func:`hub_host` / :func:`hub_reachable`: whether the Hugging Face hub answers, in seconds (one TCP
  connection), where transformers' own retries take half a minute.
"""

from __future__ import annotations

import os
import socket
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
    try:
        with socket.create_connection((hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False
