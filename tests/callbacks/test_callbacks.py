"""Plugin callbacks and loggers: memory against an outside measurement, W&B offline read back with W&B's
own reader, throughput keys, and a user's own callback enabled with one YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from lit_lora.callbacks.throughput import flops_per_token

from lit_lora.loggers.wandb_logger import choose_mode, flat_config
from lit_lora.models.embedded import cache_root
from tests.helpers import ROOT, TINY

SHORT = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.train_size=32",
    "data.val_size=8",
    "data.test_size=4",
    "data.score_max_new_tokens=8",
]


def test_peak_rss_matches_the_kernels_count_for_the_same_process(tmp_path):
    """The tracker reads /proc/self/status; the parent of the process reads getrusage(RUSAGE_CHILDREN)."""
    probe = textwrap.dedent(
        """
        import resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "lit_lora.train", *sys.argv[1:]], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        """
    )
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", probe, *TINY, f"output_dir={out}", "score=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outside_mb = float(done.stdout.strip().splitlines()[-1])
    memory = json.loads((out / "summary.json").read_text())["memory"]
    assert memory["device"] == "cpu" and {"model_load", "first_step", "steady_state"} <= set(memory["phases"])
    print(f"tracker peak {memory['peak_rss_mb']} MB, kernel (outside) {outside_mb:.1f} MB")
    assert abs(memory["peak_rss_mb"] - outside_mb) <= 0.05 * outside_mb
    metrics = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"memory/rss_mb", "memory/peak_rss_mb", "perf/samples_per_s", "perf/step_time_s"} <= set(metrics)


@pytest.mark.slow
def test_offline_wandb_run_reads_back(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1", WANDB_API_KEY="")  # no credentials -> offline
    # The suite's own cache: under the new HOME the embedded tokenizer would be converted again (~20 s).
    env["LIT_LORA_CACHE"] = str(cache_root())
    done = subprocess.run(
        # The tiny model: what is checked is the W&B run, not the model (the default one costs ~15 s more).
        [sys.executable, "-m", "lit_lora.train", "logger=wandb", "model=tiny", *SHORT, f"output_dir={out}"],
        cwd=ROOT,
        env={**env, "HF_HOME": os.environ.get("HF_HOME", str(tmp_path / "hf"))},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wandb sync" in done.stdout
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    inspect = subprocess.run(
        [wandb_cli, "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspect.returncode == 0, inspect.stderr
    record = json.loads(inspect.stdout)
    assert record["state"] == "finished"
    config, summary = record["config"], record["summary"]
    assert config["model.name_or_path"] == "tiny-random-llama" and config["lora.r"] == 8
    assert config["output_dir"] == str(out), "the resolved config, interpolations filled in"
    assert summary["score_tuned.exact_match"] >= 0 and summary["score_tuned.n"] == 4
    assert summary["trainable_params"] == 7_168  # r=8 on the 2 layers' q, k, v, o projections
    assert any(k.startswith("memory/") for k in summary) and "memory.peak_rss_mb" in summary
    assert "perf/tokens_per_s" in summary and "tokens_per_s" in summary, sorted(summary)

    history = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120
    )
    rows = [json.loads(line) for line in history.stdout.splitlines() if '"type":"history"' in line]
    losses = [r["history"]["item"]["train/loss"] for r in rows if "train/loss" in r["history"]["item"]]
    assert len(losses) == 4, "one train/loss point per step"
    # Retention (callbacks/retention.py), on by default: a point per validation, in the summary too.
    for key in ("retention/kl", "retention/nll_ratio", "retention/agreement"):
        points = [r["history"]["item"][key] for r in rows if key in r["history"]["item"]]
        assert len(points) == 2 and all(p >= 0 for p in points), (key, points)
        assert summary[key] == points[-1]


def test_wandb_mode_without_credentials_is_offline(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert choose_mode("auto") == "offline"
    assert choose_mode("disabled") == "disabled"


def test_flat_config_drops_secrets_and_keeps_structure():
    flat = flat_config(
        {"a": {"b": 1, "api_key": "x", "wandb_token": "y", "tokens_per_s": 3.0}, "c": [1, 2], "d": [{"e": 1}]}
    )
    assert flat == {"a.b": 1, "a.tokens_per_s": 3.0, "c": [1, 2], "d": "[{'e': 1}]"}


def test_lora_flops_per_token_is_four_n_plus_two_trainable():
    assert flops_per_token(100, 10) == 420


def test_your_own_callback_needs_one_module_and_one_yaml(tmp_path):
    """Exactly what the README tells a user to do, with nothing else changed."""
    name = f"example_{uuid.uuid4().hex[:8]}"
    module = ROOT / "callbacks" / f"{name}.py"
    config = ROOT / "conf" / "callbacks" / f"{name}.yaml"
    marker = tmp_path / "seen.json"
    module.write_text(
        textwrap.dedent(
            """
            import json
            import lightning as L

            class StepCounter(L.Callback):
                def __init__(self, path: str):
                    self.path, self.steps = path, 0

                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    self.steps += 1

                def on_train_end(self, trainer, pl_module):
                    with open(self.path, "w") as f:
                        json.dump({"steps": self.steps}, f)
            """
        )
    )
    config.write_text(f"{name}:\n  _target_: lit_lora.callbacks.{name}.StepCounter\n  path: {marker}\n")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lit_lora.train",
                *TINY,
                f"+callbacks={name}",
                f"output_dir={tmp_path / 'run'}",
                "score=false",
            ],
            cwd=tmp_path,  # another working directory: callbacks/ is an installed package
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        module.unlink()
        config.unlink()
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(marker.read_text()) == {"steps": 4}


def test_tensorboard_logger_writes_events_beside_the_csv(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lit_lora.train",
            *TINY,
            "logger=tensorboard",
            f"output_dir={out}",
            "score=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "train/loss" in (out / "metrics.csv").read_text().splitlines()[0]
