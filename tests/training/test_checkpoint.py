"""Adapter-only checkpoints: the file format, atomic saves, size bounds and exact resume after SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lit_lora.errors import UserError
from lit_lora.training.checkpoint_io import TMP_PREFIX, find_resumable, read_checkpoint, write_checkpoint
from lit_lora.training.run import train
from tests.helpers import DPO, ROOT, TINY, compose_train

EVERY_2_STEPS = [
    "callbacks.adapter_checkpoint.every_n_train_steps=2",
    "callbacks.adapter_checkpoint.monitor=null",
    "callbacks.adapter_checkpoint.save_top_k=1",
]


def test_format_round_trips_every_entry_type(tmp_path):
    checkpoint = {
        "global_step": 7,
        "adapter": {
            "weights": {"a.lora_A.weight": torch.randn(2, 3)},
            "config": {"r": 2, "target_modules": ["q"]},
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(2, 3)}},
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            }
        ],
        "rng": {
            "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 3, 0, 0.0),
            "python": (3, (1, 2, 3), None),
        },
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}}, "nested": [1, 2.5, None, True]}},
        "best": float("inf"),
    }
    write_checkpoint(checkpoint, tmp_path / "step-000007.ckpt")
    back = read_checkpoint(tmp_path / "step-000007.ckpt")
    assert torch.equal(
        back["adapter"]["weights"]["a.lora_A.weight"], checkpoint["adapter"]["weights"]["a.lora_A.weight"]
    )
    state = back["optimizer_states"][0]["state"]
    assert list(state) == [0] and torch.equal(
        state[0]["exp_avg"], checkpoint["optimizer_states"][0]["state"][0]["exp_avg"]
    )
    assert back["rng"]["python"] == (3, (1, 2, 3), None)
    assert np.array_equal(back["rng"]["numpy"][1], np.arange(5)) and back["rng"]["numpy"][0] == "MT19937"
    assert back["loops"] == checkpoint["loops"] and back["best"] == float("inf")
    # The adapter folder is plain PEFT format.
    assert set(load_file(str(tmp_path / "step-000007.ckpt" / "adapter" / "adapter_model.safetensors"))) == {
        "a.lora_A.weight"
    }


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    write_checkpoint({"global_step": 4}, tmp_path / "step-000004.ckpt")
    # What a save killed half way leaves: a hidden temporary folder, and maybe a folder without state.json.
    (tmp_path / f"{TMP_PREFIX}step-000006.ckpt-1234").mkdir()
    (tmp_path / f"{TMP_PREFIX}step-000006.ckpt-1234" / "state.json").write_text('{"global_step": 6}')
    (tmp_path / "step-000008.ckpt").mkdir()
    assert find_resumable(tmp_path) == tmp_path / "step-000004.ckpt"
    write_checkpoint({"global_step": 4}, tmp_path / "last.ckpt")
    assert find_resumable(tmp_path) == tmp_path / "last.ckpt", "last wins a tie"
    write_checkpoint({"global_step": 9}, tmp_path / "last.ckpt")  # replacing an existing one
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 9
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*")), "the next save cleans up leftovers"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_lora.train", *args]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_auto_is_bitwise_equal_to_an_uninterrupted_run_for_dpo(tmp_path):
    """One SIGKILL at a checkpoint of a DPO run. SFT runs are killed three times, at random moments, by
    the chaos test (tests/training/test_reliability.py), which checks the same equality."""
    common = [
        *TINY,
        *DPO,
        "trainer.max_steps=24",
        "trainer.val_check_interval=8",
        "data.train_size=40",  # 5 batches per epoch: the kill lands mid-epoch or at a boundary
        "lora.dropout=0.1",  # dropout draws from the RNG, which must be restored too
        "score=false",
        *EVERY_2_STEPS,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = subprocess.run(
        _cli(*common, f"output_dir={whole}"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    kill_at = random.Random().randrange(4, 17, 2)
    print(f"killing at step {kill_at}")
    proc = subprocess.Popen(
        _cli(*common, f"output_dir={broken}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    # Any checkpoint at or past the step: with save_top_k=1 that folder lives only ~2 steps (0.3 s), and a
    # poll descheduled that long must not fail the test; the kill may land anywhere after it.
    while not any(int(p.name[5:11]) >= kill_at for p in (broken / "checkpoints").glob("step-??????.ckpt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (broken / "adapter").exists(), "the killed run must not have finished"

    resumed = subprocess.run(
        _cli(*common, f"output_dir={broken}", "resume=auto"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    expected, got = _adapter(whole), _adapter(broken)
    assert expected.keys() == got.keys()
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k), "B weights moved off zero"
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, (
        f"{len(different)} adapter tensors differ after resume from step {kill_at}, e.g. {different[:2]}"
    )


def test_resume_rejects_an_adapter_that_does_not_fit(tmp_path):
    run = tmp_path / "run"
    train(compose_train([*TINY, f"output_dir={run}", "trainer.max_steps=2", "score=false", *EVERY_2_STEPS]))
    ckpt = run / "checkpoints" / "step-000002.ckpt"
    assert ckpt.is_dir()
    with pytest.raises(UserError, match="does not fit this model"):
        train(
            compose_train(
                [*TINY, f"output_dir={tmp_path / 'other'}", "lora.r=4", f"resume={ckpt}", "score=false"]
            )
        )
    with pytest.raises(UserError, match="not a complete lit-lora checkpoint"):
        train(compose_train([*TINY, f"output_dir={tmp_path / 'third'}", f"resume={tmp_path}", "score=false"]))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_checkpoint_size_is_adapter_plus_optimizer(tmp_path, quant):
    run = tmp_path / "run"
    result = train(
        compose_train(
            [
                f"output_dir={run}",
                f"quant={quant}",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.enable_progress_bar=false",
                "data.train_size=16",
                "data.val_size=4",
                "data.test_size=2",
                "score=false",
                *EVERY_2_STEPS,
            ]
        )
    )
    ckpt = run / "checkpoints" / "step-000002.ckpt"
    adapter_bytes = sum(p.numel() * p.element_size() for p in result.model.parameters() if p.requires_grad)
    # AdamW keeps two moments per trainable parameter, in the parameter's dtype (fp32 here).
    optimizer_bytes = 2 * adapter_bytes
    bound = 1.1 * (adapter_bytes + optimizer_bytes) + 1_000_000
    size = _dir_size(ckpt)
    print(
        f"quant={quant}: checkpoint {size:,} bytes; adapter {adapter_bytes:,}, optimizer {optimizer_bytes:,}, bound {bound:,.0f}"
    )
    assert size <= bound
    assert size >= adapter_bytes + optimizer_bytes, "adapter and both AdamW moments are all there"
