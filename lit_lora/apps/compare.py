"""Compare runs side by side, offline, from what each run folder holds: ``lit-lora compare``.

Usage::

    lit-lora compare runs/multirun/2026-11-28/12-00-00   # a sweep folder
    lit-lora compare runs/a runs/b --out report/          # or run folders

One row per run: the overrides that differ between the runs, status, trainable parameters, adapter size
on disk, peak memory, tokens/s, best validation loss and perplexity, held-out exact match, wall time.
The table is printed and written as ``compare.md`` and ``compare.csv``; the plots
``loss_curves.png`` (training and validation loss overlaid), ``memory.png``, ``throughput.png`` and
``score.png`` are written next to them (default: into the sweep folder, or the current folder), for
preference runs (``objective=dpo`` ...) ``preference.png``: validation preference accuracy and
reward margin by step, for GRPO runs ``reward.png``: the training and validation reward by step (the
held-out reward, base and tuned, is in the table), and for runs that measured retention (``callbacks/retention.py``)
``score_vs_drift.png``: task score against ``retention/kl``, one point per run.
Reads ``summary.json``, ``failed.json``, ``metrics*.csv`` and ``.hydra/overrides.yaml``; never W&B.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from lit_lora.errors import UserError
from lit_lora.paths import confined
from lit_lora.training.sweep import FAILED_FILE, differing_keys, job_overrides

COLUMNS = (
    ("run", "run"),
    ("overrides", "overrides"),
    ("status", "status"),
    ("trainable_params", "trainable params"),
    ("adapter_mb", "adapter MB"),
    ("peak_memory_mb", "peak memory MB"),
    ("tokens_per_s", "tokens/s"),
    ("best_val_loss", "best val loss"),
    ("best_val_ppl", "best val ppl"),
    ("score", "held-out exact match %"),
    ("score_base", "base exact match %"),
    ("preference_accuracy", "val preference accuracy %"),
    ("reward_margin", "val reward margin"),
    ("held_out_reward", "held-out reward"),
    ("held_out_reward_base", "base held-out reward"),
    ("retention_kl", "retention KL"),
    ("retention_agreement", "base agreement %"),
    ("wall_time_s", "wall time s"),
)
# Curves read from metrics*.csv: the losses for every run, the preference figures for preference runs.
CURVES = (
    "train/loss",
    "val/loss",
    "val/rewards_accuracy",
    "val/rewards_margin",
    "train/reward",
    "val/reward",
    "retention/kl",
    "retention/agreement",
)


@dataclass
class Run:
    """One run folder, read back."""

    path: Path
    overrides: list[str]
    summary: dict
    failed: dict | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return self.summary.get("status", "incomplete")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders under ``paths``: folders holding ``summary.json``, ``failed.json`` or ``.hydra/overrides.yaml``."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise SystemExit(f"lit-lora: error: {path} is not a folder")
        if _is_run(path):
            candidates = [path]
        else:
            markers = [
                *path.rglob("summary.json"),
                *path.rglob(FAILED_FILE),
                *path.rglob(".hydra/overrides.yaml"),
            ]
            folders = {m.parent.parent if m.parent.name == ".hydra" else m.parent for m in markers}
            # Skip hidden folders (.hydra, .tmp-*) and anything inside them.
            candidates = [c for c in folders if not any(p.startswith(".") for p in c.relative_to(path).parts)]
        found += [c for c in candidates if _is_run(c) and c not in found]
    return sorted(found, key=lambda p: (len(p.parts), int(p.name) if p.name.isdigit() else 0, str(p)))


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in ("summary.json", FAILED_FILE, ".hydra/overrides.yaml"))


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The :data:`CURVES` by step from ``metrics.csv`` (and the files of earlier, resumed parts)."""
    curves: dict[str, list[tuple[int, float]]] = {key: [] for key in CURVES}
    for path in sorted(run_dir.glob("metrics*.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for key in curves:
                    if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                        curves[key].append((int(float(row["step"])), float(row[key])))
    return {k: sorted(set(v)) for k, v in curves.items()}


def read_run(run_dir: Path) -> Run:
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    failed_file = run_dir / FAILED_FILE
    failed = json.loads(failed_file.read_text()) if failed_file.is_file() else None
    return Run(run_dir, job_overrides(run_dir), summary, failed, read_curves(run_dir))


def varying(runs: list[Run]) -> list[list[str]]:
    """Per run, only the overrides whose value is not the same in every run (all of them for one run)."""
    if len(runs) < 2:
        return [r.overrides for r in runs]
    differ = differing_keys([r.overrides for r in runs])
    return [[o for o in r.overrides if o.split("=", 1)[0] in differ] for r in runs]


def _file_mb(path: Path) -> float | None:
    return round(path.stat().st_size / 1e6, 2) if path.is_file() else None


def row_of(run: Run, overrides: list[str]) -> dict:
    s = run.summary
    memory = s.get("memory", {})
    peak = memory.get("peak_allocated_mb") or memory.get("peak_rss_mb") or s.get("peak_rss_mb")
    best = s.get("best_val_loss", s.get("val_loss"))
    preference = s.get("preference") or {}
    accuracy, margin = preference.get("rewards_accuracy"), preference.get("rewards_margin")
    reward, reward_base = s.get("reward_tuned") or {}, s.get("reward_base") or {}
    return {
        "run": run.path.name,
        "overrides": " ".join(overrides),
        "status": run.status if not run.failed else f"failed: {run.failed.get('error', '')}",
        "trainable_params": s.get("trainable_params"),
        "adapter_mb": _file_mb(run.path / "adapter" / "adapter_model.safetensors"),
        "peak_memory_mb": peak,
        "tokens_per_s": s.get("tokens_per_s"),
        "best_val_loss": None if best is None else round(best, 4),
        # A preference loss is not a log-perplexity.
        # A preference loss is not a log-perplexity, nor GRPO's (the negative validation reward).
        "best_val_ppl": None if best is None or preference or reward else round(math.exp(best), 3),
        "score": None if "score_tuned" not in s else round(s["score_tuned"]["exact_match"], 1),
        "score_base": None if "score_base" not in s else round(s["score_base"]["exact_match"], 1),
        "preference_accuracy": None if accuracy is None else round(100 * accuracy, 1),
        "reward_margin": None if margin is None else round(margin, 4),
        "held_out_reward": None if reward.get("total") is None else round(reward["total"], 4),
        "held_out_reward_base": None if reward_base.get("total") is None else round(reward_base["total"], 4),
        "retention_kl": None if s.get("retention/kl") is None else round(s["retention/kl"], 4),
        "retention_agreement": None
        if s.get("retention/agreement") is None
        else round(100 * s["retention/agreement"], 1),
        "wall_time_s": s.get("wall_time_s"),
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def terminal(rows: list[dict]) -> str:
    table = [[title for _, title in COLUMNS]] + [[_cell(r[key]) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)


def plots(runs: list[Run], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(r["overrides"] or r["run"], 28) for r in rows]
    written = []
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        color = f"C{i % 10}"
        train = run.curves.get("train/loss", [])
        val = run.curves.get("val/loss", [])
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=f"{label} (train)", linewidth=1.2)
        if val:
            ax.plot(*zip(*val, strict=True), color=color, linestyle="--", marker="o", label=f"{label} (val)")
    ax.set(xlabel="step", ylabel="loss", title="Training (solid) and validation (dashed) loss")
    losses = [v for run in runs for key in ("train/loss", "val/loss") for _, v in run.curves.get(key, [])]
    if losses and min(losses) > 0:  # GRPO's losses go below 0 (and its val/loss is a negative reward)
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    written.append(out / "loss_curves.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    for key, title, name in (
        ("peak_memory_mb", "Peak memory (MB)", "memory.png"),
        ("tokens_per_s", "Training throughput (tokens/s)", "throughput.png"),
        ("score", "Held-out exact match (%)", "score.png"),
    ):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
        values = [r[key] or 0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[_cell(r[key]) for r in rows], fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
        written.append(out / name)
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if any(run.curves.get("val/rewards_accuracy") for run in runs):
        written.append(_preference_plot(plt, runs, labels, out / "preference.png"))
    if any(run.curves.get("train/reward") for run in runs):
        written.append(_reward_plot(plt, runs, labels, out / "reward.png"))
    if any(r["retention_kl"] is not None for r in rows):
        written.append(_drift_plot(plt, rows, labels, out / "score_vs_drift.png"))
    return written


def _drift_plot(plt, rows: list[dict], labels: list[str], path: Path) -> Path:
    """Task score against drift from the base, one point per run: up and to the left is better.
    The score is the held-out exact match where runs were scored, else the best validation loss."""
    scored = any(r["score"] is not None for r in rows)
    key, ylabel = (
        ("score", "held-out exact match (%)") if scored else ("best_val_loss", "best validation loss")
    )
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        if row["retention_kl"] is None or row[key] is None:
            continue
        ax.scatter(row["retention_kl"], row[key], color=f"C{i % 10}", s=40)
        ax.annotate(
            label, (row["retention_kl"], row[key]), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    ax.set(xlabel="retention/kl: mean KL(base || tuned) on general prompts", ylabel=ylabel)
    ax.set_title("Task score vs drift from the base")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _reward_plot(plt, runs: list[Run], labels: list[str], path: Path) -> Path:
    """GRPO: the mean reward of the rollouts (training) and of greedy validation answers, by step."""
    fig, (train, val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        for ax, key in ((train, "train/reward"), (val, "val/reward")):
            points = run.curves.get(key, [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(
                    steps,
                    values,
                    color=f"C{i % 10}",
                    marker="o" if key == "val/reward" else None,
                    label=label,
                )
    train.set(xlabel="step", ylabel="reward", title="Training reward (mean over the rollouts)")
    val.set(xlabel="step", ylabel="reward", title="Validation reward (greedy answers)")
    train.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _preference_plot(plt, runs: list[Run], labels: list[str], path: Path) -> Path:
    """Validation preference accuracy and reward margin by step, one line per preference run."""
    fig, (accuracy, margin) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        for ax, key, scale in ((accuracy, "val/rewards_accuracy", 100), (margin, "val/rewards_margin", 1)):
            points = run.curves.get(key, [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, [scale * v for v in values], color=f"C{i % 10}", marker="o", label=label)
    accuracy.set(
        xlabel="step", ylabel="%", title="Validation preference accuracy (reward of chosen > rejected)"
    )
    margin.set(xlabel="step", ylabel="reward", title="Validation reward margin (chosen - rejected)")
    accuracy.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def compare(paths: list[Path], out: Path | None = None) -> tuple[list[dict], Path]:
    """Read the runs, write the table and the plots; returns the rows and the output folder."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise SystemExit(
            f"lit-lora: error: no run folder (with summary.json or config.yaml) under {', '.join(map(str, paths))}"
        )
    runs = [read_run(d) for d in run_dirs]
    rows = [row_of(run, o) for run, o in zip(runs, varying(runs), strict=True)]
    out = out or (paths[0] if len(paths) == 1 and paths[0] not in run_dirs else Path.cwd())
    try:
        out = confined("--out", str(out))
    except UserError as err:
        raise SystemExit(f"lit-lora: error: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown(rows))
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    plots(runs, rows, out)
    return rows, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lit-lora compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder, or run folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write compare.md/.csv and the PNGs")
    args = parser.parse_args(argv)
    rows, out = compare(args.paths, args.out)
    print(terminal(rows))
    print(f"\nlit-lora: {len(rows)} runs; wrote compare.md, compare.csv and the plots in {out}")
    if any(r["status"] != "completed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
