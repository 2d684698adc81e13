"""The benchmarks must keep running: tiny smoke runs of make bench's harness and of make bench-gpu.

A benchmark whose own code runs in one process (``bench.systems``, ``bench.speed_paths``) and the
harnesses that start one process per system (``bench.gpu``, ``bench.grpo``) run their ``main`` in this
process: the same code and argument parsing as ``python -m``, without paying the imports of torch,
transformers, PEFT, Lightning and TRL again (~8 CPU seconds per process). The per-system processes the
harnesses start stay real processes (``python -m bench.gpu --system ...``), and
``test_bench_gpu_refuses_without_cuda_unless_dry_run`` starts ``python -m bench.gpu`` itself, so the
``-m`` entry points and their exit statuses are still run."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from bench.speed_paths import VARIANTS
from tests.helpers import ROOT


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _main(module: str, *args: str, monkeypatch, capsys) -> tuple[object, str, str]:
    """``python -m <module> <args>`` from the repository root as a call of its ``main`` in this process:
    its return value and what it printed to stdout and stderr (an exception it raises fails the test, as
    the traceback of a failed ``python -m`` did)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *args])
    capsys.readouterr()  # only what main prints
    returned = importlib.import_module(module).main()
    captured = capsys.readouterr()
    return returned, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.bnb
def test_bench_gpu_dry_run_trains_both_systems_on_a_tiny_quantized_mistral(monkeypatch, capsys):
    args = ["--dry-run", "--rounds", "1", "--steps", "3"]
    code, out, err = _main("bench.gpu", *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err[-3000:]
    summary = json.loads(out[out.index("{\n") :])["summary"]
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
def test_each_bench_system_runs_and_reports(system, data, monkeypatch, capsys):
    # 8 examples in batches of 4: a warm-up step and one timed step, the fewest that give a throughput.
    args = ["--system", system, "--data", data, "--examples", "8", "--batch-size", "4"]
    _, out, _ = _main("bench.systems", *args, monkeypatch=monkeypatch, capsys=capsys)
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    assert result["trained_tokens_per_s"] > 0 and result["peak_memory_mb"] > 0
    assert result["adapter_bytes"] > 1_000_000  # LoRA r=8 on q/k/v/o of SmolLM2-135M, fp32
    # lit-lora runs with its speed paths; the peers get plain transformers + PEFT (speed=off).
    assert result["speedups_on"] is (system == "lit")


def test_bench_paths_dry_run_times_every_variant_against_speed_off_and_the_defaults(monkeypatch, capsys):
    _, out, _ = _main("bench.speed_paths", "--dry-run", monkeypatch=monkeypatch, capsys=capsys)
    rows = json.loads(out[out.index("{\n") :])["rows"]
    names = [r["variant"] for r in rows]
    assert names[:2] == ["speed=off", "lit-lora defaults"] and "speed.fused_swiglu=false" in names
    # every path off in turn; torch.compile is left out of the dry run
    assert names == [name for name, variant in VARIANTS.items() if variant != "compile"]
    assert all(r["tokens_per_s"] > 0 and r["speed_vs_off"] > 0 and r["speed_vs_defaults"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_grpo_dry_run_trains_lit_lora_and_trl_one_tiny_step_each(monkeypatch, capsys):
    _, out, _ = _main("bench.grpo", "--dry-run", monkeypatch=monkeypatch, capsys=capsys)
    report = json.loads(out[out.index("{\n") :])
    assert report["dry_run"] and report["settings"]["steps"] == 1
    for system in ("lit", "trl"):
        row = report["table"][system]
        assert row["prompts_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["split_s"]["rollout_s"] > 0 and row["split_s"]["logps_s"] > 0
        assert row["completion_tokens_per_step"] > 0
    assert report["ratios"]["prompts_per_s"] > 0 and report["ratios"]["peak_memory"] > 0
