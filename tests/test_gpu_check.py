"""``make gpu-check`` must keep working between GPU loans: its ``--dry-run`` runs the same steps on the CPU
(tiny model, a few steps), and its budget, timeout and carry helpers are checked without a device.

The script's ``main`` runs in the test's process (``python -m bench.gpu_check`` is ``sys.exit(main())``): its
steps are CLI runs in processes of their own either way, and a process for ``main`` itself would only add
an interpreter start with torch's imports to each test."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from tests.helpers import ROOT


def _main(*args: str, root: Path, monkeypatch) -> int:
    """``python -m bench.gpu_check <args>``'s exit status, with ``root`` as the output root."""
    monkeypatch.setenv(gpu_check.OUTPUT_ROOT_ENV, str(root))
    return gpu_check.main(list(args))


@pytest.mark.slow
@pytest.mark.bnb
def test_dry_run_trains_resumes_and_refuses_16_true_on_the_cpu_under_the_output_root(
    tmp_path, monkeypatch, capsys
):
    root, out = tmp_path / "root", tmp_path / "report" / "gpu-check.json"
    root.mkdir()
    rc = _main("--dry-run", "--out", str(out), root=root, monkeypatch=monkeypatch)
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads(out.read_text())
    passed, steps = report["passed"], report["steps"]
    assert report["dry_run"] is True and report["all_passed"] is True
    for name in ("qlora", "qlora_resume", "grpo_nf4", "fp16_true_refused"):
        assert passed[name] is True, json.dumps(steps[name], indent=1)[-4000:]
    for name in ("fp16_mixed_article", "fsdp_nf4", "memory_snapshot", "bench_gpu"):
        assert passed[name] is None and steps[name]["status"] == "skipped: needs CUDA"
    for key in ("torch", "transformers", "peft", "bitsandbytes", "lightning"):
        assert report["versions"][key]

    qlora, resume = steps["qlora"], steps["qlora_resume"]
    assert "quant=nf4" in qlora["command"]
    figures = qlora["figures"]
    assert figures["global_step"] == 4 and figures["memory_device"] == "cpu"
    assert figures["score_rows"] == 4 and "score_tuned_exact_match" in figures
    assert figures["score_wall_s"] >= 0
    assert resume["checks"]["resumed_from_step_4"] and resume["figures"]["global_step"] == 6

    grpo = steps["grpo_nf4"]
    assert "objective=grpo" in grpo["command"] and "quant=nf4" in grpo["command"]
    assert grpo["checks"]["completions_written"] and grpo["figures"]["global_step"] == 2

    refusal = steps["fp16_true_refused"]
    assert refusal["rc"] not in (0, 124) and refusal["message"].startswith("lit-lora: error: ")
    assert "16-true" in refusal["message"]

    # Every run folder lies under the output root, in runs/gpu-check/<timestamp>/<step> (lit_lora.paths).
    run_root = Path(report["run_root"])
    assert run_root.parent == root / "runs" / "gpu-check"
    for name in ("qlora", "qlora_resume"):
        run = Path(steps[name]["run_dir"])
        assert run == run_root / name
        assert (run / "summary.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_root / f"{name}.log").is_file()
    assert (run_root / "qlora" / "checkpoints" / "last.ckpt").is_dir()


def test_a_budget_too_small_skips_every_step_without_failing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "report.json"
    rc = _main("--dry-run", "--budget-s", "1", "--out", str(out), root=tmp_path, monkeypatch=monkeypatch)
    assert rc == 0, capsys.readouterr().err[-3000:]
    report = json.loads(out.read_text())
    assert set(report["passed"].values()) == {None}
    assert all(step["status"].startswith("skipped: ") for step in report["steps"].values())
    assert report["steps"]["qlora"]["status"].startswith("skipped: no time left")
    assert report["steps"]["qlora_resume"]["status"] == "skipped: qlora did not pass"


def test_refuses_without_cuda_unless_dry_run(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = _main("--out", str(tmp_path / "r.json"), root=tmp_path, monkeypatch=monkeypatch)
    assert rc == 2 and "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_step_past_its_timeout_is_killed_with_its_output_and_dated_lines(tmp_path):
    code = (
        "import time; print('first', flush=True); time.sleep(2); print('second', flush=True); time.sleep(60)"
    )
    # 2 s apart, asserted >= 1 s: the reader thread may see 'first' late on a loaded machine.
    done = gpu_check.run_logged(
        [sys.executable, "-c", code], tmp_path / "step.log", timeout_s=6, env=dict(os.environ)
    )
    assert done["rc"] == 124 and done["timed_out"] and done["wall_s"] < 20
    assert "first" in done["output"] and "second" in done["output"]
    assert (tmp_path / "step.log").read_text() == done["output"]
    first, second = gpu_check.time_of(done, "first"), gpu_check.time_of(done, "second")
    assert first is not None and second is not None and second - first >= 1.0
    assert gpu_check.time_of(done, "never printed") is None


def test_carried_versions_come_from_the_constraints_file():
    versions = gpu_check.pinned(gpu_check.CARRIED + gpu_check.BUILT_HERE)
    assert set(versions) == set(gpu_check.CARRIED + gpu_check.BUILT_HERE)
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    for name, version in versions.items():
        assert any(line.lower() == f"{name}=={version}".lower() for line in constraints), name
