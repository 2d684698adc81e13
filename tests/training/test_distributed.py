"""Scaling must not change the numbers: gradient accumulation, DDP (real gloo processes), world-size moves.

Every run here trains the tiny random Llama in fp32 with LoRA dropout 0 on demo rows of unequal
lengths, so that a loss averaged per micro-batch (instead of over the step's trained tokens) would
show up as a difference.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from lit_lora.config.schema import to_train_config
from lit_lora.data.batching import EpochSampler, StepBatchSampler
from lit_lora.errors import UserError
from lit_lora.models.builder import build_model
from lit_lora.training.run import train
from lit_lora.training.strategies import build_strategy
from tests.helpers import (
    CKPT_EVERY_2,
    DPO,
    EXACT,
    ROOT,
    Run,
    assert_same_steps,
    compose_train,
    ddp,
    free_port,
    run_cli,
    train_with_accumulation,
)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_step_sampler_splits_each_step_over_ranks_and_tags_its_token_count():
    lengths = list(range(10, 30))
    trained = [n // 2 for n in lengths]
    order = EpochSampler(lengths, batch_size=2, seed=3)
    one = StepBatchSampler(order, trained, micro=4, accum=1)
    ranks = [StepBatchSampler(order, trained, micro=2, accum=1, rank=r, world=2) for r in (0, 1)]
    steps_one = one.steps(0)
    steps_two = [s.steps(0) for s in ranks]
    assert len(steps_one) == 5 and all(len(s) == 5 for s in steps_two)
    for k, step in enumerate(steps_one):
        together = sorted(i for s in steps_two for mb in s[k] for i, _ in mb)
        assert together == sorted(i for mb in step for i, _ in mb), "same examples per step"
        tags = {t for s in steps_two for mb in s[k] for _, t in mb} | {t for mb in step for _, t in mb}
        assert tags == {sum(trained[i] for mb in step for i, _ in mb)}
    # A ragged last step is trained by one process, dropped by two (ranks must stay in lock-step).
    assert len(StepBatchSampler(order, trained, micro=3).steps(0)) == 7
    assert len(StepBatchSampler(order, trained, micro=3, rank=1, world=2).steps(0)) == 3


def test_gradient_accumulation_8x1_4x2_2x4_give_the_same_loss_and_adapter(tmp_path):
    assert_same_steps(train_with_accumulation(tmp_path, [*EXACT, "trainer.max_steps=3"]))


def _check_ddp_run(run: Run, single: Path) -> None:
    assert "x 2 devices" in run.done.stdout, "the effective batch line counts both processes"
    assert _max_diff(_adapter(run.out), _adapter(single)) < 1e-6
    # Rank zero wrote the summary; the memory tracker reports both ranks in it.
    summary = json.loads((run.out / "summary.json").read_text())
    assert len(summary["memory"]["per_rank"]) == 2
    assert run.done.stdout.count("effective batch") == 1, "progress lines come from rank zero only"


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process_with_the_same_global_batch(ddp_run, reference_run):
    _check_ddp_run(ddp_run, reference_run.out)


def _two_nodes(launch: str, node: int, port: int, out: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of node ``node`` of a 2-node run (one process per node), started as a
    cluster starts it: ``torchrun --nnodes 2 --node-rank N`` or SLURM's variables for ``srun``."""
    args = [
        "-m", "lit_lora.train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.num_nodes=2", *EXACT, *CKPT_EVERY_2, f"output_dir={out}", "data.batch_size=4",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if launch == "torchrun":
        torchrun = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}"]
        return [sys.executable, *torchrun, "--master-addr=127.0.0.1", f"--master-port={port}", *args], env
    slurm = {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lit-lora", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(node), "SLURM_NODEID": str(node),
        "SLURM_LOCALID": "0", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port),
    }  # fmt: skip
    return [sys.executable, *args], {**env, **slurm}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "slurm"])
def test_two_nodes_one_process_each_equal_one_process(reference_run, launch, tmp_path):
    """``trainer.num_nodes=2``, one process per node, on this machine's loopback (issue 36, point 4)."""
    out, port = tmp_path / "run", free_port()
    nodes = []
    for node in (1, 0):
        command, env = _two_nodes(launch, node, port, out)
        log = open(tmp_path / f"node{node}.log", "w+")  # noqa: SIM115 (closed below)
        nodes.append(
            (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    logs = []
    try:
        statuses = [proc.wait(timeout=300) for proc, _ in nodes]
    finally:
        for proc, log in nodes:
            proc.kill()
            log.seek(0)
            logs.append(log.read())
            log.close()
    assert statuses == [0, 0], "\n".join(text[-3000:] for text in logs)
    # Each node found its rank in what the launcher set (not a second rank 0 of its own).
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[0] and "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[1]
    assert _max_diff(_adapter(out), _adapter(reference_run.out)) < 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["memory"]["per_rank"]) == 2


@pytest.mark.slow
def test_ddp_equals_one_process_for_a_preference_objective_too(tmp_path):
    common = [*EXACT, *DPO]
    # The one-process side runs in this process (what the command line runs, without its start-up).
    single = train(compose_train([*common, f"output_dir={tmp_path / 'single'}", "data.batch_size=8"]))
    assert single.summary["status"] == "completed"
    done = run_cli(*ddp(*common, f"output_dir={tmp_path / 'ddp'}", "data.batch_size=4"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_ddp_run(Run(tmp_path / "ddp", done), tmp_path / "single")


@pytest.mark.parametrize("name", ["default", "cpu", "ddp", "fsdp"])
def test_every_strategy_config_composes_and_maps_to_a_lightning_strategy(tmp_path, name):
    cfg = to_train_config(compose_train(["model=tiny", f"trainer={name}", f"output_dir={tmp_path}"]))
    built = build_model(cfg)
    model = built.model
    strategy = build_strategy(cfg, built)
    if name == "fsdp":
        assert isinstance(strategy, FSDPStrategy)
        layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
        lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
        policy = strategy.kwargs["auto_wrap_policy"]
        # PEFT's policy: a unit per decoder layer and one per trainable leaf (LoRA A and B).
        assert policy(module=layer, recurse=False, nonwrapped_numel=1)
        assert policy(module=lora_a, recurse=False, nonwrapped_numel=1)
        assert not policy(module=layer.input_layernorm, recurse=False, nonwrapped_numel=1)
    elif name == "ddp":  # Lightning's DDP with lit-lora's launcher and the configured timeout
        from lightning.pytorch.strategies import DDPStrategy

        assert isinstance(strategy, DDPStrategy)
        assert strategy._timeout == datetime.timedelta(seconds=cfg.trainer.process_group_timeout_s)
    else:
        assert strategy == "auto"
    if name in ("ddp", "fsdp"):
        from lightning.fabric.plugins.environments import LightningEnvironment

        from lit_lora.training.launcher import WatchedLauncher

        strategy.cluster_environment = LightningEnvironment()
        strategy._configure_launcher()
        assert isinstance(strategy.launcher, WatchedLauncher)


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_configs_compose_and_are_refused_with_the_reason(tmp_path, name):
    from lit_lora.config.device import check_strategy_combinations

    cfg = to_train_config(compose_train(["model=tiny", f"trainer={name}", f"output_dir={tmp_path}"]))
    with pytest.raises(UserError, match="resume would restart at step 0"):
        check_strategy_combinations(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("ddp", "single"), ("single", "ddp")])
def test_checkpoint_moves_between_world_sizes_2_and_1(tmp_path, first, second, reference_run, ddp_run):
    """The step-2 checkpoint of a 4-step run under one world size (the shared runs), resumed under the
    other, ends where 4 steps in one process end (the first run went on to step 4, so the LR schedule
    is the same)."""
    (checkpoint,) = ({"ddp": ddp_run, "single": reference_run}[first].out / "checkpoints").glob(
        "step-000002*"
    )
    args = [*EXACT, *CKPT_EVERY_2, f"output_dir={tmp_path / 'second'}", f"resume={checkpoint}"]
    args = ddp(*args, "data.batch_size=4") if second == "ddp" else (*args, "data.batch_size=8")
    resumed = run_cli(*args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 2)" in resumed.stdout
    assert _max_diff(_adapter(tmp_path / "second"), _adapter(reference_run.out)) < 1e-6
