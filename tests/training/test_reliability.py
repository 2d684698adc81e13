"""Faults injected on purpose: kills, a full disk, signals, NaN and inf, out of memory, hostile files.

Faults come from ``LIT_LORA_FAULTS`` (see :mod:`lit_lora.training.faults`). A run whose test is about the
process (its exit status, its one line on stderr, a signal, a kill) is the real CLI in a real process. A run
whose test checks what it trains, writes or refuses (a reference run, a resume, a skipped step, a refused
config or checkpoint) runs in the test's process through :func:`lit_lora.training.run.run`, which composes
and checks exactly what the CLI does and raises the :class:`~lit_lora.errors.UserError` whose message and
``exit_code`` the CLI would print and exit with: each interpreter start costs ~8 s of CPU in imports alone.
``CHAOS_KILLS`` sets the number of kills of the chaos test (CI: 2, one inside a checkpoint write and one at a
random moment; ``make chaos``: 20).
"""

from __future__ import annotations

import json
import os
import pickle
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

from lit_lora.errors import UserError
from lit_lora.training.checkpoint_io import TMP_PREFIX, checkpoint_step, find_resumable
from tests.helpers import ROOT, TINY

EVERY_2_STEPS = [
    "callbacks.adapter_checkpoint.every_n_train_steps=2",
    "callbacks.adapter_checkpoint.monitor=null",
    "callbacks.adapter_checkpoint.save_top_k=-1",
]
COMMON = [*TINY, "score=false", "data.train_size=40", "lora.dropout=0.1", *EVERY_2_STEPS]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_lora.train", *args]


def _env(faults: str = "", **extra: str) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "LIT_LORA_FAULTS": faults, **extra}


def _run(*args: str, faults: str = "", timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cli(*args), cwd=ROOT, env=_env(faults, **env), capture_output=True, text=True, timeout=timeout
    )


def _train_here(*overrides: str, faults: str = "") -> dict:
    """``lit-lora train <overrides>`` in this process, with ``faults`` injected; returns its summary. A user
    error raises :class:`UserError` (its message is the CLI's last stderr line, its ``exit_code`` the CLI's
    exit status)."""
    from lit_lora.training import faults as injected
    from lit_lora.training.run import run

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(injected.ENV, faults)
        injected._faults.cache_clear()  # read once per process: make this run read its own
        try:
            return run(list(overrides))
        finally:
            injected._faults.cache_clear()  # the next run reads the restored environment


def _last_line(err: UserError) -> str:
    """The last line the CLI prints on stderr for ``err`` (:func:`lit_lora.errors.exit_with`)."""
    return f"lit-lora: error: {err}".splitlines()[-1]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _bitwise_equal(a: Path, b: Path) -> list[str]:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


# ----------------------------------------------------------------------------------------- 1. kill chaos
def test_kill_chaos_resume_auto_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    kills = int(os.environ.get("CHAOS_KILLS", "2"))
    steps = 10 * kills  # long enough that every kill finds the run still going
    common = [*COMMON, f"trainer.max_steps={steps}", "trainer.val_check_interval=10"]
    whole, chaos = tmp_path / "whole", tmp_path / "chaos"
    # The uninterrupted reference and the final resume run in this process (the same code and thread count
    # as the killed CLI runs, which inherit this environment): only the kills need processes of their own.
    _train_here(*common, f"output_dir={whole}")

    seed = random.randrange(2**32)
    print(f"chaos seed {seed}")  # the random kill moments of a failing run can be replayed
    rng = random.Random(seed)
    ckpts = chaos / "checkpoints"
    inside_save = delivered = 0
    for i in range(kills):
        # Every checkpoint write sleeps 0.3 s half way, so that even kills land inside one. A temporary
        # folder left by the previous kill is removed only once this run starts: wait for a new one.
        stale = set(ckpts.glob(f"{TMP_PREFIX}*"))
        proc = subprocess.Popen(
            _cli(*common, f"output_dir={chaos}", "resume=auto"),
            cwd=ROOT,
            env=_env("slow_save=0.3"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 240
        if i % 2 == 0:  # inside a checkpoint write: as soon as a temporary folder appears
            while not set(ckpts.glob(f"{TMP_PREFIX}*")) - stale and proc.poll() is None:
                assert time.time() < deadline
                time.sleep(0.005)
            inside_save += proc.poll() is None
        else:  # at a random moment of the run
            time.sleep(rng.uniform(2.0, 7.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            delivered += 1
        proc.wait(timeout=60)
        if (chaos / "adapter").exists():
            break  # it finished before the kill
    print(f"chaos: {delivered} SIGKILLs delivered ({inside_save} inside a checkpoint write), {steps} steps")
    assert delivered == kills, f"only {delivered} of {kills} kills found the run alive"
    assert inside_save >= 1, "at least one kill must land inside a checkpoint write"
    finished = (chaos / "summary.json").exists()
    try:
        _train_here(*common, f"output_dir={chaos}", "resume=auto")
    except UserError:
        if not finished:
            raise
        # else the last kill came after the run finished: nothing left to resume
    assert not _bitwise_equal(whole, chaos), "adapter after kills differs from the uninterrupted run"
    assert not any(ckpts.glob(f"{TMP_PREFIX}*")), "temporary files are cleaned up"


# ----------------------------------------------------------------------------------------- 2. disk full
def test_enospc_half_way_through_a_save_keeps_the_previous_checkpoint_for_resume(tmp_path, capsys):
    common = [*COMMON, "trainer.max_steps=8", "trainer.val_check_interval=8"]
    run = tmp_path / "run"
    failed = _run(*common, f"output_dir={run}", faults="enospc_save@2")  # the step-4 save fails
    assert failed.returncode == 4, failed.stderr[-2000:]
    message = failed.stderr.strip().splitlines()[-1]
    ckpts = run / "checkpoints"
    kept = find_resumable(ckpts)
    assert checkpoint_step(kept) == 2, "the previous (step 2) checkpoint is the one resume takes"
    assert message.startswith("lit-lora: error: no space left") and str(kept) in message
    assert "Traceback" not in failed.stderr
    # The resume is checked for what it takes (step 2) and leaves behind, not as a process: in this process.
    _train_here(*common, f"output_dir={run}", "resume=auto")
    assert "(step 2)" in capsys.readouterr().out
    assert not any(ckpts.glob(f"{TMP_PREFIX}*"))


# ----------------------------------------------------------------------------------------- 3. signals
@pytest.mark.parametrize(
    "signum,when",
    [
        (signal.SIGTERM, "first step"),
        (signal.SIGUSR1, "mid-save"),
        (signal.SIGTERM, "mid-accumulation"),
        (signal.SIGTERM, "mid-validation"),
        (signal.SIGTERM, "after the batch hooks"),
    ],
)
def test_signal_saves_a_complete_checkpoint_and_exits_within_the_grace_period(tmp_path, capsys, signum, when):
    run = tmp_path / "run"
    extra = {
        "first step": [],
        "mid-save": [],
        "mid-accumulation": ["trainer.accumulate_grad_batches=4", "data.batch_size=2"],
        "mid-validation": ["trainer.val_check_interval=2", "data.val_size=64"],
        "after the batch hooks": ["trainer.val_check_interval=2"],
    }[when]
    # "after the batch hooks": the run sends itself SIGTERM after step 3's hooks, where Lightning's own
    # SIGTERM check comes before any of GracefulStop's (a timed signal lands there now and then).
    faults = {"mid-save": "slow_save=1.0", "after the batch hooks": "sigterm@3"}.get(when, "")
    proc = subprocess.Popen(
        _cli(*COMMON, *extra, "trainer.max_steps=400", f"output_dir={run}", "grace_period_s=60"),
        cwd=ROOT,
        env=_env(faults),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if when == "mid-save" and any((run / "checkpoints").glob(f"{TMP_PREFIX}*")):
            break
        if when == "first step" and (run / "config.yaml").exists():
            break  # the handler is in place before config.yaml: the model is still loading
        if when in ("mid-accumulation", "mid-validation") and (run / "metrics.csv").exists():
            break
        time.sleep(0.01)
    sent = time.time()
    if when != "after the batch hooks":
        proc.send_signal(signum)
    _out, err = proc.communicate(timeout=120)
    assert time.time() - sent < 60, "exited within the grace period"
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "resume=auto" in err.strip().splitlines()[-1]
    saved = find_resumable(run / "checkpoints")
    assert saved is not None
    state = json.loads((saved / "state.json").read_text())
    if when in ("first step", "after the batch hooks"):  # saved at the next step boundary
        assert state["global_step"] == {"first step": 1, "after the batch hooks": 4}[when]
    if when == "mid-accumulation":
        assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] % 4 == 0
    if when == "mid-accumulation":  # the checkpoint sits on a step boundary: a resume takes it as is
        step = state["global_step"]
        _train_here(*COMMON, *extra, f"trainer.max_steps={step + 2}", f"output_dir={run}", "resume=auto")
        assert f"(step {step})" in capsys.readouterr().out


def test_slurm_sigusr1_requeues_once_from_rank_zero(tmp_path):
    """Lightning's SLURM auto-requeue is wired: SIGUSR1 saves and calls ``scontrol requeue <job>``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = _env(
        "",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="lit-lora",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
    )
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(*COMMON, "trainer.max_steps=400", f"output_dir={run}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run / "metrics.csv").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    # Lightning saves an hpc checkpoint and requeues; the job itself is then ended by SLURM.
    while not (calls.exists() and calls.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(1.0)  # a second requeue call would come now
    proc.kill()
    proc.wait(timeout=60)
    assert calls.read_text().split("\n").count("requeue 4242") == 1
    assert list(run.glob("hpc_ckpt_*.ckpt")), "Lightning saved its requeue checkpoint"


# ----------------------------------------------------------------------------------------- 4. NaN / inf
def test_nan_loss_aborts_naming_the_step_and_batch(tmp_path):
    done = _run(*COMMON, "trainer.max_steps=6", f"output_dir={tmp_path / 'run'}", faults="nan_loss@3")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert re.search(r"step 3 \(batch \d+ of epoch 0\): the training loss is nan", last), last
    assert "Traceback" not in done.stderr


def test_inf_gradient_with_skip_leaves_the_weights_bitwise_unchanged_for_that_step(tmp_path, capsys):
    """Step 3 skipped: the adapter after step 3 equals the adapter after step 2, bitwise (the run completes and
    its files are what is checked: in this process)."""
    common = [
        *COMMON,
        "trainer.max_steps=3",
        "on_nonfinite=skip",
        "callbacks.adapter_checkpoint.every_n_train_steps=1",
        "callbacks.adapter_checkpoint.save_top_k=-1",
    ]
    run = tmp_path / "run"
    _train_here(*common, f"output_dir={run}", faults="inf_grad@3")
    out = capsys.readouterr().out
    assert "step 3" in out and "step skipped" in out
    after2 = load_file(
        str(run / "checkpoints" / "step-000002.ckpt" / "adapter" / "adapter_model.safetensors")
    )
    after3 = _adapter(run)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)
    after1 = load_file(
        str(run / "checkpoints" / "step-000001.ckpt" / "adapter" / "adapter_model.safetensors")
    )
    assert not all(torch.equal(after1[k], after2[k]) for k in after1), "other steps do train"


def test_consecutive_nonfinite_skips_abort(tmp_path):
    """In this process: how an abort ends the CLI (exit 2, one line) is the NaN test's above."""
    with pytest.raises(UserError) as stopped:
        _train_here(
            *COMMON, "trainer.max_steps=8", "on_nonfinite=skip", "max_nonfinite_skips=2",
            f"output_dir={tmp_path / 'run'}", faults="nan_loss@3,nan_loss@4",
        )  # fmt: skip
    assert stopped.value.exit_code == 2
    assert "2 consecutive steps with non-finite gradients" in _last_line(stopped.value)


# ----------------------------------------------------------------------------------------- 7. out of memory
def test_out_of_memory_exits_3_with_batch_shape_and_remedies_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    done = _run(*COMMON, "trainer.max_steps=8", f"output_dir={run}", faults="oom@5")
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    kept = find_resumable(run / "checkpoints")
    assert checkpoint_step(kept) == 4, "the step-4 checkpoint stays the one to resume from"
    for part in (
        "data.batch_size=8",
        "data.max_seq_len=",
        "gradient_checkpointing=true",
        "quant=nf4",
        str(kept),
    ):
        assert part in last, (part, last)
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------- 8. security
def test_no_torch_load_without_weights_only_anywhere_in_the_code():
    offenders = []
    for path in [
        *ROOT.glob("lit_lora/**/*.py"),
        *ROOT.glob("callbacks/**/*.py"),
        *ROOT.glob("bench/**/*.py"),
        *ROOT.glob("experiments/**/*.py"),
    ]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


class _Exploit:
    """Unpickled, it runs ``touch <mark>`` (the command is fixed when it is pickled)."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def test_a_crafted_pickle_checkpoint_is_refused_without_executing(tmp_path):
    mark = tmp_path / "executed"
    # The payload works: unpickled, it touches its mark (a control one here), so only the refusal keeps
    # the mark below from appearing.
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    ckpt = tmp_path / "evil.ckpt"
    with ckpt.open("wb") as f:
        pickle.dump({"state_dict": _Exploit(mark)}, f)
    # A pickle file posing as a checkpoint, and a checkpoint folder whose state is a pickle.
    folder = tmp_path / "step-000002.ckpt"
    folder.mkdir()
    (folder / "state.json").write_text('{"global_step": 2}')
    with (folder / "state.safetensors").open("wb") as f:
        pickle.dump(_Exploit(mark), f)
    for target in (ckpt, folder):
        # In this process: a pickle unpickled here would run here just the same. A UserError with exit
        # code 2 is what the CLI ends with one line and status 2 (no traceback); anything else escapes.
        with pytest.raises(UserError) as refused:
            _train_here(
                *COMMON, "trainer.max_steps=2", f"output_dir={tmp_path / target.name}-run", f"resume={target}"
            )
        assert refused.value.exit_code == 2, refused.value
    assert not mark.exists(), "the pickle was executed"


def test_trust_remote_code_needs_a_pinned_revision(tmp_path):
    """A config refusal: in this process (the CLI's exit status and line are those of the UserError)."""
    with pytest.raises(UserError) as refused:
        _train_here("model=tiny", "model.trust_remote_code=true", f"output_dir={tmp_path}")
    assert refused.value.exit_code == 2
    assert "model.revision" in _last_line(refused.value)


def test_secrets_never_reach_any_file_a_run_writes(tmp_path):
    canary = "canary-7f3a9d2e-secret"
    run = tmp_path / "run"
    done = _run(
        *TINY, "trainer.max_steps=2", "logger=wandb", f"output_dir={run}",
        WANDB_API_KEY=canary, HF_TOKEN=canary, WANDB_MODE="offline", WANDB_DIR=str(run),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert canary not in done.stdout and canary not in done.stderr
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "the W&B offline run is among the files searched"
    leaked = [str(p) for p in files if canary.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.parametrize("value", ["../escaped-run", "runs/../../escaped-run", "{tmp}/escaped-run", "a\x00b"])
def test_output_paths_cannot_leave_the_output_root(tmp_path, monkeypatch, value):
    """Without output_root / $LIT_LORA_OUTPUT_ROOT the root is the working directory: '..', an absolute
    path elsewhere and a NUL are refused before anything is written."""
    from hydra.errors import HydraException

    from lit_lora.errors import UserError
    from lit_lora.paths import OUTPUT_ROOT_ENV
    from lit_lora.training.run import train
    from tests.helpers import compose_train

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(OUTPUT_ROOT_ENV)
    # Hydra's override grammar already rejects a NUL; lit-lora rejects it in YAML-set values too.
    with pytest.raises((UserError, HydraException), match="output_dir"):
        train(compose_train([*TINY, f"output_dir={value.format(tmp=tmp_path)}"]))
    assert not (tmp_path / "escaped-run").exists()


def test_plugin_folders_and_hydra_dirs_cannot_leave_the_output_root(tmp_path, monkeypatch):
    """A callback's dirpath or a logger's save_dir is checked like output_dir; hydra.run.dir and merge's
    output_dir on the command line are refused before Hydra creates the folder; output_root= widens it."""
    from lit_lora.errors import UserError
    from lit_lora.paths import OUTPUT_ROOT_ENV
    from lit_lora.training.run import train
    from tests.helpers import compose_train

    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(inside))
    for override in [f"callbacks.adapter_checkpoint.dirpath={outside}", f"logger.csv.save_dir={outside}"]:
        with pytest.raises(UserError, match=override.split("=")[0]):
            train(compose_train([*TINY, f"output_dir={inside / 'run'}", override]))
    for module, arg in [
        ("lit_lora.train", f"hydra.run.dir={outside}"),
        ("lit_lora.merge", f"output_dir={outside}"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", module, arg, "adapter=x"] if "merge" in module else [sys.executable, "-m", module, arg],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, OUTPUT_ROOT_ENV: str(inside)},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-1000:]
        assert "outside the output root" in proc.stderr and "Traceback" not in proc.stderr
    assert not outside.exists()
    # The same folder is accepted once the root is widened on purpose (composition and typed check only).
    from lit_lora.paths import confined

    assert confined("output_dir", str(outside / "run"), str(tmp_path)) == outside / "run"


def test_values_from_secret_environment_variables_are_redacted_in_what_a_run_writes(tmp_path, monkeypatch):
    """config.yaml and logged hyperparameters take ``redacted_config``: ${oc.env:<SECRET>} values become ***."""
    from omegaconf import OmegaConf

    from lit_lora.loggers.wandb_logger import REDACTED, flat_config, redacted_config
    from tests.helpers import compose_train

    canary = "canary-41c2-env-secret"
    monkeypatch.setenv("MY_SERVICE_API_KEY", canary)
    monkeypatch.setenv("PLAIN_SETTING", "runs-here")
    cfg = compose_train(
        [*TINY, f"output_dir={tmp_path}", "+logger.csv.prefix=${oc.env:MY_SERVICE_API_KEY}",
         "logger.csv.name=${oc.env:PLAIN_SETTING}"]
    )  # fmt: skip
    assert cfg.logger.csv.prefix == canary, "the live config keeps the value for whoever needs it"
    written = OmegaConf.to_yaml(redacted_config(cfg))
    assert canary not in written and f"prefix: '{REDACTED}'" in written
    assert "name: runs-here" in written, "values from ordinary variables are kept"
    assert canary not in str(flat_config(redacted_config(cfg)))
