"""Hydra multirun sweeps: failures reported without stopping the sweep, W&B groups, and lit_lora.apps.compare."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_lora.models.embedded import cache_root
from lit_lora.training.checkpoint_io import checkpoint_step, find_resumable
from lit_lora.training.sweep import FAILED_FILE, sweep_jobs
from tests.helpers import DPO, ROOT

FAST = [
    "model=tiny",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.precision=32",
    "trainer.enable_progress_bar=false",
    "data.train_size=16",
    "data.val_size=4",
    "data.test_size=2",
    "data.score_max_new_tokens=2",
]


def multirun(
    sweep_dir: Path, *overrides: str, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_lora.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_lora.compare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def sweep_with_a_failure(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep") / "s"
    done = multirun(sweep, *FAST, "lora.r=0,4,2")
    return sweep, done


def test_a_failing_job_does_not_stop_the_others(sweep_with_a_failure):
    sweep, done = sweep_with_a_failure
    assert done.returncode == 1, "the sweep exits non-zero because a job failed"
    assert "Traceback" not in done.stderr
    assert "sweep" in done.stdout and "2 of 3 jobs completed" in done.stdout
    assert "FAILED lora.r=0: lora.r must be >= 1, got 0" in done.stdout
    for job in ("1", "2"):
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"
        assert (sweep / job / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((sweep / "0" / "failed.json").read_text())["type"] == "UserError"


def test_a_signal_stops_the_sweep_after_checkpointing_the_running_job(tmp_path):
    sweep = tmp_path / "s"
    # Job 0 sends itself SIGTERM after step 1: it stops at step 2 with a checkpoint; job 1 never starts.
    done = multirun(sweep, *FAST, "lora.r=2,4", "score=false", env={"LIT_LORA_FAULTS": "sigterm@1"})
    assert done.returncode == 143, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "the sweep stopped at this job" in done.stderr.strip().splitlines()[-1]
    jobs = sweep_jobs(sweep)
    assert [j.name for j in jobs] == ["0"]
    assert json.loads((jobs[0] / FAILED_FILE).read_text())["type"] == "Interrupted"
    assert checkpoint_step(find_resumable(jobs[0] / "checkpoints")) == 2


def test_a_signal_after_the_last_step_ends_the_sweep_once_that_job_completes(tmp_path):
    sweep = tmp_path / "s"
    # SIGTERM while job 0 scores its held-out rows, after its last step: no safe point is left, the job
    # completes, and the sweep must not start job 1.
    env = {"LIT_LORA_FAULTS": "sigterm_after_fit@2"}
    done = multirun(sweep, *FAST, "lora.r=2,4", "data.test_size=2", env=env)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "received after this job's last step" in done.stderr.strip().splitlines()[-1]
    jobs = sweep_jobs(sweep)
    assert [j.name for j in jobs] == ["0"]
    assert json.loads((jobs[0] / "summary.json").read_text())["status"] == "completed"
    assert not (jobs[0] / FAILED_FILE).exists()


def test_compare_reads_the_sweep_offline(sweep_with_a_failure, tmp_path):
    sweep, _ = sweep_with_a_failure
    done = compare(str(sweep), "--out", str(tmp_path))
    assert done.returncode == 1, "a failed run in the table makes compare exit non-zero"
    with (tmp_path / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["overrides"] for r in rows] == ["lora.r=0", "lora.r=4", "lora.r=2"]
    assert rows[0]["status"].startswith("failed: lora.r must be >= 1")
    assert int(rows[1]["trainable_params"]) == 2 * int(rows[2]["trainable_params"]), (
        "r=4 has twice r=2's parameters"
    )
    assert float(rows[1]["adapter_mb"]) > float(rows[2]["adapter_mb"]) > 0
    assert all(float(r["best_val_loss"]) > 0 for r in rows[1:])
    # Retention per run, read back from each summary, and the score-vs-drift scatter.
    assert all(
        float(r["retention_kl"]) >= 0 and 0 <= float(r["retention_agreement"]) <= 100 for r in rows[1:]
    )
    assert rows[0]["retention_kl"] == "", "the failed run measured nothing"
    for name in (
        "compare.md",
        "loss_curves.png",
        "memory.png",
        "throughput.png",
        "score.png",
        "score_vs_drift.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000 or name == "compare.md"
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "lora.r=4" in done.stdout and "| run |" in (tmp_path / "compare.md").read_text()


def test_offline_wandb_dpo_sweep_runs_share_the_sweep_group_and_log_the_rewards(tmp_path):
    """A DPO sweep (issue 21: W&B groups with every objective; SFT's W&B run is read back in
    tests/callbacks/test_callbacks.py)."""
    sweep = tmp_path / "wb-sweep"
    env = {k: "" for k in os.environ if k.startswith("WANDB_")} | {"WANDB_API_KEY": "", "HOME": str(tmp_path)}
    env["LIT_LORA_CACHE"] = str(cache_root())  # not a new, empty cache under the new HOME
    done = multirun(sweep, *FAST, *DPO, "logger=wandb", "lora.r=2,4", "score=false", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    groups, names = set(), set()
    for job in ("0", "1"):
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        records = subprocess.run(
            [wandb_cli, "leet", "inspect", "--json", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        run = next(json.loads(line)["run"] for line in records.stdout.splitlines() if '"type":"run"' in line)
        summary = json.loads(
            subprocess.run(
                [wandb_cli, "leet", "inspect", "--summary", "--json", str(run_dir)],
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        )
        assert summary["state"] == "finished" and summary["exit_code"] == 0
        assert summary["config"]["lora.r"] == (2 if job == "0" else 4)
        assert summary["config"]["objective.name"] == "dpo"
        rewards = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen")
        logged = summary["summary"]  # the last logged values, and lit-lora's summary.json flattened
        assert all(isinstance(logged.get(f"val/{k}"), int | float) for k in rewards), sorted(logged)
        assert logged["preference.rewards_margin"] == logged["val/rewards_margin"]
        groups.add(run["run_group"])
        names.add(run["display_name"])
    assert groups == {"sweep-wb-sweep"}
    assert len(names) == 2 and all(f"lora.r={r}" in " ".join(names) for r in (2, 4))


@pytest.mark.slow
def test_two_by_two_dpo_sweep_with_qlora_jobs_is_compared_in_one_table(tmp_path):
    """``-m objective.beta=... quant=none,nf4`` on the preference demo: DPO with QLoRA bases in a sweep,
    compared with the preference columns and plot (SFT sweeps run in the tests below)."""
    sweep = tmp_path / "grid"
    small = [
        "model=tiny",  # the sweep machinery is under test; the default model trains in test_train.py
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "data.train_size=16",
        "data.val_size=4",
        "data.test_size=2",
        "data.score_max_new_tokens=8",
    ]
    done = multirun(sweep, *small, *DPO, "objective.beta=0.05,0.5", "quant=none,nf4", timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 of 4 jobs completed" in done.stdout
    table = compare(str(sweep))
    assert table.returncode == 0, table.stderr
    with (sweep / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["overrides"] for r in rows} == {
        "objective.beta=0.05 quant=none",
        "objective.beta=0.05 quant=nf4",
        "objective.beta=0.5 quant=none",
        "objective.beta=0.5 quant=nf4",
    }
    assert all(r["preference_accuracy"] and r["reward_margin"] for r in rows)
    for name in ("loss_curves.png", "memory.png", "throughput.png", "score.png", "preference.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"


def test_parallel_launcher_runs_jobs_in_other_processes_and_still_reports_failures(tmp_path):
    sweep = tmp_path / "parallel"
    done = multirun(sweep, "hydra/launcher=local_parallel", *FAST, "lora.r=0,4", "score=false")
    assert done.returncode == 1
    assert "1 of 2 jobs completed" in done.stdout and "FAILED lora.r=0" in done.stdout
    assert (sweep / "1" / "summary.json").is_file()


def test_optuna_preset_searches_against_validation_loss(tmp_path):
    sweep = tmp_path / "optuna"
    done = multirun(sweep, "hydra/sweeper=lr_rank_alpha", "hydra.sweeper.n_trials=2", *FAST, "score=false")
    assert done.returncode == 0, done.stderr[-3000:]
    results = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in results and "lora.r" in results and "best_value" in results
    losses = [json.loads((sweep / j / "summary.json").read_text())["best_val_loss"] for j in ("0", "1")]
    assert all(loss > 0 for loss in losses)


def test_slurm_preset_composes_with_partition_gpus_and_time():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lit_lora.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=a100", "output_dir=/tmp/x"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("a100", 1, 240)
