"""Whether the network answers, in seconds, with no lit-lora imports (anything may use it): the Hugging Face
hub (:func:`hub_host`, :func:`hub_reachable`) and any host (:func:`tcp_reachable`), where a library's own
retries would take half a minute."""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

HUB_TIMEOUT_S = 5.0


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
