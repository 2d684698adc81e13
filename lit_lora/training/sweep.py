"""Sweeps (Hydra multirun): a failing job never stops the others, and the sweep ends with a report.

Under ``-m``, :func:`lit_lora.training.run.main` catches a job's error, prints it, writes ``failed.json`` into
the job's folder (its first line and type) and returns, so the launcher goes on with the next job.
:class:`SweepReport`, a Hydra callback registered in ``conf/train.yaml``, then reads the job folders at
the end of the sweep (so it works for launchers that run jobs in other processes or on other machines),
prints how many jobs completed and, for each failed one, its overrides and the first line of its
error, and exits with status 1 if any failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FAILED_FILE = "failed.json"


def record_failure(output_dir: str | Path, err: BaseException) -> None:
    """Write ``failed.json`` (type and first line of the error) into a job's folder."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    (folder / FAILED_FILE).write_text(json.dumps({"error": first, "type": type(err).__name__}, indent=2))


def job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        return list(yaml.safe_load(path.read_text()) or [])
    except (OSError, yaml.YAMLError):
        return []


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders of a sweep (those Hydra wrote a ``.hydra`` folder into), in job order."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]

    def order(path: Path) -> tuple:
        return (0, int(path.name)) if path.name.isdigit() else (1, path.name)

    return sorted(jobs, key=order)


def differing_keys(all_overrides: list[list[str]]) -> set[str]:
    """Override keys whose value is not the same in every job (what the sweep varies)."""
    parsed = [
        dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides) for overrides in all_overrides
    ]
    keys = {k for p in parsed for k in p}
    return {k for k in keys if len({p.get(k) for p in parsed}) > 1}


def report(sweep_dir: Path, say=print) -> list[dict[str, Any]]:
    """Print the sweep's outcome; returns the failed jobs (folder, overrides, error)."""
    jobs = sweep_jobs(sweep_dir)
    failed = []
    for job in jobs:
        if (job / FAILED_FILE).is_file():
            info = json.loads((job / FAILED_FILE).read_text())
            failed.append({"job": str(job), "overrides": job_overrides(job), **info})
    say(f"lit-lora: sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed")
    differing = differing_keys([job_overrides(job) for job in jobs])
    for item in failed:
        shown = [o for o in item["overrides"] if o.split("=", 1)[0] in differing] or item["overrides"]
        say(f"lit-lora:   FAILED {' '.join(shown)}: {item['error']}  ({item['job']})")
    if jobs:
        say(f"lit-lora: compare them with: lit-lora compare {sweep_dir}")
    return failed


class SweepReport(Callback):
    """Hydra callback: the end-of-sweep report and a non-zero exit status when a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = report(Path(config.hydra.sweep.dir))
        if failed:
            sys.exit(1)
