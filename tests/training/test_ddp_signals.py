"""Signals to some or all ranks of a 2-process gloo DDP run: one decision for all ranks.

The run is the real CLI (``python -m lit_lora.train trainer=ddp ...``), whose rank 0 starts rank 1 as its
child. A SIGTERM to rank 1 alone used to hang both ranks (Lightning's handler broadcast from inside the
signal handler); now every rank stops at the same step boundary, the ranks write one checkpoint of that
step together, each exits with 143, and ``resume=auto`` ends bitwise equal to an uninterrupted 2-process
run (dropout on, so each rank's RNG state matters). Each rank reports the status it exits with through
a ``sitecustomize`` (rank 1 is not the test's child, so its status cannot be waited for).

Each target (rank 1 alone, the case that hung; rank 0 alone; both) meets each moment (a random step, a
checkpoint save in progress, validation). CI stops and resumes each of the nine pairs once;
``DDP_SIGNAL_CASES=all DDP_SIGNAL_RUNS=10`` (``make ddp-stress``) runs them 10 times each.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import CKPT_EVERY_2, ROOT, TINY, ddp, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds rank 1 through Linux /proc"),
]

COMMON = [
    *TINY,
    "score=false",
    "lora.dropout=0.1",  # dropout draws from each rank's RNG: its state must come back per rank
    "trainer.limit_val_batches=0",
    "trainer.max_steps=10",
    "data.train_size=64",
    "data.batch_size=4",
    "grace_period_s=120",
    *CKPT_EVERY_2,
]
EXIT_REPORT = "lit-lora-test: rank exits with"
# sys.exit records the status each rank ends with (lit-lora's exit_with and Hydra both call it).
SITECUSTOMIZE = f"""
import os, sys
_exit = sys.exit
def _reporting_exit(code=0):
    print("{EXIT_REPORT}", os.environ.get("LOCAL_RANK", "0"), code, file=sys.stderr, flush=True)
    _exit(code)
sys.exit = _reporting_exit
"""


def _env(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _rank1(rank0: int) -> int | None:
    """The pid of rank 1: rank 0's child running lit_lora.train."""
    try:
        children = Path(f"/proc/{rank0}/task/{rank0}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            if b"lit_lora.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return int(pid)
        except OSError:
            continue
    return None


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, not yet reaped by its parent
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run."""
    out = tmp_path_factory.mktemp("whole")
    done = run_cli(*ddp(*COMMON, f"output_dir={out}"), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


TARGETS = ("rank 1", "rank 0", "both")
MOMENTS = ("step", "save", "validation")
STRESS = os.environ.get("DDP_SIGNAL_CASES") == "all"
# Every pair once in CI, stopped and resumed (~40 s of one worker each); make ddp-stress: DDP_SIGNAL_RUNS times.
CASES = [(t, m) for t in TARGETS for m in MOMENTS] * (
    int(os.environ.get("DDP_SIGNAL_RUNS", "1")) if STRESS else 1
)
# What makes each moment last long enough for the signal to land inside it: a slow checkpoint write
# (rank 0 writes, rank 1 waits for it), or slow validation batches on every 2nd step's validation.
MOMENT_SETUP = {
    "step": ([], ""),
    "save": ([], "slow_save=1.0"),
    "validation": (
        ["trainer.limit_val_batches=null", "trainer.val_check_interval=2", "data.val_size=32"],
        "slow_val=0.2",
    ),
}


def _in_moment(run: Path, moment: str, at_least: int) -> bool:
    checkpoints = run / "checkpoints"
    if moment == "save":  # a checkpoint write has begun (its staging folder), after step at_least - 2
        return (checkpoints / f"step-{at_least - 2:06d}.ckpt").is_dir() and any(
            checkpoints.glob(".tmp-step-*")
        )
    # step: once at_least is checkpointed (a random point of a later step); validation: the step's
    # checkpoint is written just before its validation, whose 8 slow batches per rank take ~2 s.
    return (checkpoints / f"step-{at_least:06d}.ckpt").is_dir()


@pytest.mark.parametrize(("target", "moment"), CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_sigterm_to_any_rank_stops_both_at_one_step_and_resume_is_bitwise(whole, target, moment, tmp_path):
    run = tmp_path / "run"
    at_least = random.Random().randrange(2, 7, 2)  # a random step: its checkpoint shows the run got there
    if moment == "save":
        at_least += 2  # the write of that step's checkpoint
    extra, faults = MOMENT_SETUP[moment]
    print(f"signal to {target} during {moment} once step {at_least} is reached")
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lit_lora.train", *ddp(*COMMON, *extra, f"output_dir={run}")],
            cwd=ROOT,
            env={**_env(tmp_path / "site"), "LIT_LORA_FAULTS": faults},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.time() + 300
        while not _in_moment(run, moment, at_least):
            assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
            time.sleep(0.01)
        rank1 = _rank1(proc.pid)
        assert rank1 is not None
        targets = {"rank 0": [proc.pid], "rank 1": [rank1], "both": [proc.pid, rank1]}[target]
        signalled = time.time()
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
        status = proc.wait(timeout=180)
        assert _gone(rank1, 60), "rank 1 still runs"
        elapsed = time.time() - signalled
        err.seek(0)
        stderr = err.read()
    assert status == 143, stderr[-3000:]
    assert elapsed < 120, f"took {elapsed:.0f} s, over the grace period"
    exits = dict(re.findall(rf"^{EXIT_REPORT} (\d) (\S+)$", stderr, flags=re.M))
    assert exits == {"0": "143", "1": "143"}, stderr[-3000:]
    saved = set(re.findall(r"checkpoint (\S+step-(\d{6})\.ckpt) saved at step", stderr))
    assert len(saved) == 1, stderr[-3000:]  # one checkpoint, the same step on both ranks
    path, step = saved.pop()
    assert int(step) >= at_least and Path(path).is_dir()
    assert stderr.count("saved at step") == 2  # each rank says it
    print(f"stopped at step {step}, {elapsed:.1f} s after the signal")

    # The resumed run goes on without validation or slow faults: neither changes the trained weights.
    resumed = run_cli(*ddp(*COMMON, f"output_dir={run}", "resume=auto"), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    expected, got = _adapter(whole), _adapter(run)
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ after resume from step {step}"


KILLS = range(int(os.environ.get("DDP_SIGNAL_RUNS", "1")) if STRESS else 1)


@pytest.mark.parametrize("attempt", KILLS)
def test_sigkill_of_rank_1_mid_step_ends_rank_0_naming_it_and_resume_auto_completes(whole, attempt, tmp_path):
    """A dying rank (issue 36, point 3): rank 0 leaves within 60 s with one line naming the lost rank and
    the newest complete checkpoint, status 5 (not 143), and ``resume=auto`` completes the run."""
    from lit_lora.errors import RankLost

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lit_lora.train", *ddp(*COMMON, f"output_dir={run}")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    at_least = random.Random().randrange(2, 7, 2)  # then a random moment of a later step
    deadline = time.time() + 300
    while not (run / "checkpoints" / f"step-{at_least:06d}.ckpt").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.01)
    rank1 = _rank1(proc.pid)
    assert rank1 is not None
    os.kill(rank1, signal.SIGKILL)
    killed = time.time()
    _out, stderr = proc.communicate(timeout=120)
    elapsed = time.time() - killed
    assert proc.returncode == RankLost.exit_code, stderr[-3000:]
    assert elapsed < 60, f"rank 0 took {elapsed:.0f} s to leave"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "was killed by SIGKILL" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert re.search(rf"rank 1 \(pid {rank1}\) was killed by SIGKILL", lines[0])
    assert re.search(r"newest complete checkpoint is \S+\.ckpt \(step \d+\)", lines[0]), lines[0]
    print(f"rank 0 left {elapsed:.1f} s after rank 1 was killed: {lines[0]}")

    resumed = run_cli(*ddp(*COMMON, f"output_dir={run}", "resume=auto"), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    expected, got = _adapter(whole), _adapter(run)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resume after a lost rank differs"


def test_a_ddp_sweep_stops_with_143_after_the_running_jobs_checkpoint(tmp_path):
    """``-m`` over ``trainer=ddp`` jobs (issue 36, point 5): job 0 completes on two ranks; a SIGTERM to
    rank 1 of job 1 stops that job at a step boundary with its checkpoint, the sweep exits 143, and job 2
    never starts. (Before, each job's rank 1 re-ran the whole ``-m`` line, and the second job waited for a
    rank that was never started: rank 0's environment still said it had been launched externally.)"""
    from lit_lora.training.checkpoint_io import checkpoint_step, find_resumable
    from lit_lora.training.sweep import FAILED_FILE, sweep_jobs

    sweep = tmp_path / "s"
    command = [sys.executable, "-m", "lit_lora.train", "-m", *ddp(*COMMON), "lora.r=2,4,8"]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(
            [*command, f"hydra.sweep.dir={sweep}"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.time() + 400
        while not (sweep / "1" / "checkpoints" / "step-000002.ckpt").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before the signal"
            time.sleep(0.01)
        rank1 = _rank1(proc.pid)
        assert rank1 is not None
        os.kill(rank1, signal.SIGTERM)
        status = proc.wait(timeout=180)
        err.seek(0)
        stderr = err.read()
    assert status == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    # Rank 0's last word (rank 1, a process of its own on the same stderr, may write after it).
    assert re.search(r"^lit-lora: error: .*the sweep stopped at this job", stderr, flags=re.M), stderr[-3000:]
    assert [job.name for job in sweep_jobs(sweep)] == ["0", "1"]
    assert (sweep / "0" / "summary.json").is_file() and (sweep / "0" / "train_ddp_process_1.log").is_file()
    assert json.loads((sweep / "1" / FAILED_FILE).read_text())["type"] == "Interrupted"
    saved = re.findall(r"checkpoint (\S+) saved at step (\d+)", stderr)
    assert len(set(saved)) == 1 and Path(saved[0][0]).parent == sweep / "1" / "checkpoints", stderr[-3000:]
    assert checkpoint_step(find_resumable(sweep / "1" / "checkpoints")) == int(saved[0][1])
