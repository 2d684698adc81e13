"""Weights & Biases for lit-lora: one run per training job, offline when it must be, never hanging.

:func:`wandb_logger` is the ``_target_`` of ``conf/logger/wandb.yaml``. It returns Lightning's
``WandbLogger`` with:

- ``mode=auto`` (default): online only when credentials exist (``WANDB_API_KEY`` or a netrc entry) and
  the W&B host answers a 3 s connection probe; otherwise offline, so a run never waits on the network;
- group / name / tags derived from Hydra: the group is the experiment preset, or the sweep folder under
  ``-m`` so that the runs of one sweep sit together; the name is the run's overrides; tags are the chosen
  config group options (``model=...``, ``quant=...``).

:func:`finish_runs` (called by :func:`lit_lora.training.run.train` in a ``finally``) writes the run summary,
optionally uploads the adapter as an artifact, finishes the run even when training failed, and prints
the ``wandb sync`` command for an offline run. :func:`flat_config` gives the resolved config as
``a.b.c`` keys, without anything that looks like a secret.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lit_lora.network import tcp_reachable

# Whole words only: "hf_token" and "api_key" are secrets, "tokens_per_s" is not.
SECRET = re.compile(
    r"(^|[._-])(api[_-]?key|token|secret|password|passwd|credentials?)($|[._-])", re.IGNORECASE
)
GROUPS = ("model", "quant", "lora", "data", "optim", "experiment")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return tcp_reachable(url.hostname or "api.wandb.ai", url.port or 443, timeout)


def choose_mode(mode: str) -> str:
    """``online``, ``offline`` or ``disabled``; ``auto`` (and an unset ``WANDB_MODE``) decides by credentials and network."""
    mode = os.environ.get("WANDB_MODE", mode) if mode == "auto" else mode
    if mode in ("dryrun",):
        return "offline"
    if mode not in ("auto", "online"):
        return mode
    return "online" if has_credentials() and reachable() else "offline"


def hydra_labels() -> dict[str, Any]:
    """Group, name and tags from the running Hydra job ({} outside ``lit-lora train``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:  # not under @hydra.main (tests compose configs directly)
        return {}
    choices = {k: v for k, v in hc.runtime.choices.items() if k in GROUPS and v not in (None, "null")}
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    group = f"sweep-{Path(hc.sweep.dir).name}" if multirun else choices.get("experiment")
    name = hc.job.override_dirname or Path(hc.runtime.output_dir).name
    if multirun:
        name = f"{hc.job.num}:{name}"
    return {"group": group, "name": name, "tags": [f"{k}={v}" for k, v in sorted(choices.items())]}


def wandb_logger(
    project: str = "lit-lora",
    entity: str | None = None,
    mode: str = "auto",
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
    save_dir: str = ".",
    log_adapter: bool = False,
):
    """A Lightning ``WandbLogger`` set up as described in the module docstring (None when disabled)."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    chosen = choose_mode(mode)
    if chosen == "disabled":
        return None
    labels = hydra_labels()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        entity=entity,
        group=group or labels.get("group"),
        name=name or labels.get("name"),
        tags=list(tags or labels.get("tags") or []),
        save_dir=save_dir,
        offline=chosen == "offline",
        mode=chosen,
        settings=wandb.Settings(init_timeout=60, silent=True),
    )
    logger.lit_lora_log_adapter = log_adapter
    return logger


_ENV_REF = re.compile(r"\$\{oc\.env:([^,}]+)")
REDACTED = "***"


def redacted_config(cfg) -> dict:
    """The resolved config as a dict, with every value that comes from a secret-looking environment
    variable (``${oc.env:HF_TOKEN}``, ``${oc.env:MY_API_KEY}``...) replaced by ``***``.

    What lit-lora writes (``config.yaml``, logger hyperparameters) goes through this; the live config
    keeps the real value for whatever needs it."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def walk(raw_node, node):
        if isinstance(raw_node, dict) and isinstance(node, dict):
            return {k: walk(raw_node.get(k), v) for k, v in node.items()}
        if isinstance(raw_node, list) and isinstance(node, list) and len(raw_node) == len(node):
            return [walk(r, v) for r, v in zip(raw_node, node, strict=True)]
        if isinstance(raw_node, str) and any(SECRET.search(name) for name in _ENV_REF.findall(raw_node)):
            return REDACTED
        return node

    return walk(raw, resolved)


def flat_config(config: dict, prefix: str = "", keep_records: bool = True) -> dict[str, Any]:
    """``{"a.b": v}`` for every leaf of ``config``; keys that look like secrets are left out.

    Lists of dicts (records, such as example answers) become strings, or are dropped when
    ``keep_records`` is false."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if SECRET.search(str(key)):
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{dotted}.", keep_records))
        elif isinstance(value, (list, tuple)):
            if all(not isinstance(v, dict) for v in value):
                out[dotted] = list(value)
            elif keep_records:
                out[dotted] = str(value)
        else:
            out[dotted] = value
    return out


def finish_runs(loggers: list, summary: dict | None, adapter_dir: Path | None, failed: bool, say) -> None:
    """Summary, optional adapter artifact and ``finish`` for every W&B logger; never raises."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger.experiment
        try:
            if summary:
                run.summary.update(flat_config(summary, keep_records=False))
            if (
                summary
                and getattr(logger, "lit_lora_log_adapter", False)
                and adapter_dir
                and adapter_dir.is_dir()
            ):
                import wandb

                artifact = wandb.Artifact(f"adapter-{run.id}", type="model")
                artifact.add_dir(str(adapter_dir))
                run.log_artifact(artifact)
            offline = run.settings.mode == "offline" or run.offline
            sync_dir = run.settings.sync_dir
        finally:
            run.finish(exit_code=1 if failed else 0)
        if offline:
            say(f"W&B run saved offline in {sync_dir}; upload it with: wandb sync {sync_dir}")
