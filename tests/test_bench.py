"""The benchmarks must keep running: tiny smoke runs of make bench's harness and of make bench-gpu."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.speed_paths import VARIANTS
from tests.helpers import ROOT


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.bnb
def test_bench_gpu_dry_run_trains_both_systems_on_a_tiny_quantized_mistral():
    done = _run("-m", "bench.gpu", "--dry-run", "--rounds", "1", "--steps", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{\n") :])["summary"]
    for system in ("lit", "hf"):
        assert summary[system]["tokens_per_s"] > 0 and summary[system]["peak_memory_gib"] > 0


def test_bench_gpu_refuses_without_cuda_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = _run("-m", "bench.gpu", timeout=120)
    assert done.returncode == 2 and "--dry-run" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(  # raw: the plainest loop, run by make bench
    ("system", "data"), [("lit", "mix"), ("hf", "variable")]
)
def test_each_bench_system_runs_and_reports(system, data):
    done = _run(
        "-m",
        "bench.systems",
        "--system",
        system,
        "--data",
        data,
        "--examples",
        "12",
        "--batch-size",
        "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert result["trained_tokens_per_s"] > 0 and result["peak_memory_mb"] > 0
    assert result["adapter_bytes"] > 1_000_000  # LoRA r=8 on q/k/v/o of SmolLM2-135M, fp32
    # lit-lora runs with its speed paths; the peers get plain transformers + PEFT (speed=off).
    assert result["speedups_on"] is (system == "lit")


def test_bench_paths_dry_run_times_every_variant_against_speed_off_and_the_defaults():
    done = _run("-m", "bench.speed_paths", "--dry-run", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout[done.stdout.index("{\n") :])["rows"]
    names = [r["variant"] for r in rows]
    assert names[:2] == ["speed=off", "lit-lora defaults"] and "speed.fused_swiglu=false" in names
    # every path off in turn; torch.compile is left out of the dry run
    assert names == [name for name, variant in VARIANTS.items() if variant != "compile"]
    assert all(r["tokens_per_s"] > 0 and r["speed_vs_off"] > 0 and r["speed_vs_defaults"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_grpo_dry_run_trains_lit_lora_and_trl_one_tiny_step_each():
    done = _run("-m", "bench.grpo", "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{\n") :])
    assert report["dry_run"] and report["settings"]["steps"] == 1
    for system in ("lit", "trl"):
        row = report["table"][system]
        assert row["prompts_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["split_s"]["rollout_s"] > 0 and row["split_s"]["logps_s"] > 0
        assert row["completion_tokens_per_step"] > 0
    assert report["ratios"]["prompts_per_s"] > 0 and report["ratios"]["peak_memory"] > 0
