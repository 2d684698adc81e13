"""Non-finite values under a loss scaler, across ranks, and gradient clipping under FSDP (lit_lora.training.module).

Every run is a real ``lightning.Trainer`` fit of the tiny random Llama wrapped in :class:`LitLoRA`:

- ``16-mixed`` with a real ``torch.amp.GradScaler`` on CPU (fp16 autocast works on CPU in this torch);
  its initial scale is set so high that the first steps overflow for sure;
- two real gloo processes (DDP, and FSDP) where only one rank meets a NaN or an infinity: both ranks
  must take the same decision. This module is also the rank script of those runs
  (``python -m tests.training.test_nonfinite``, see :func:`_rank_main`);
- FSDP norm clipping, in one process (gloo, world size 1) and in the two-process FSDP run.

Lightning refuses ``FSDPStrategy`` without CUDA (``_AcceleratorConnector._check_strategy_and_fallback``
checks ``type(strategy) is FSDPStrategy``) and wraps the model with ``device_id=root_device.index``,
``None`` on CPU, which torch's FSDP reads as "find an accelerator" (``_init_device_handle`` raises).
:class:`CPUFSDPStrategy` changes only that: the same wrap with ``device_id=cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lit_lora.config.schema import SpeedConfig, to_train_config
from lit_lora.data.rendering import IGNORE_INDEX
from lit_lora.errors import UserError
from lit_lora.models.builder import build_model
from lit_lora.training.distributed import end_process_group
from lit_lora.training.module import LitLoRA
from lit_lora.training.strategies import decoder_layer_classes
from tests.helpers import ROOT, compose_train, free_port

# Untied embeddings: torch's FSDP with use_orig_params fails on the tiny model's tied embedding and
# output weights when the world size is 1 (NO_SHARD; an AssertionError in _use_unsharded_views at the
# second forward), which is not what these tests are about.
TINY_MODEL = ["model=tiny", "lora.dropout=0.0", "model.config_overrides.tie_word_embeddings=false"]


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with the wrap that its CUDA-only checks keep from running on CPU."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def _tiny_module(tmp: Path, **kwargs) -> LitLoRA:
    cfg = to_train_config(compose_train([*TINY_MODEL, f"output_dir={tmp}"]))
    built = build_model(dataclasses.replace(cfg, speed=SpeedConfig.off()))
    return LitLoRA(built.model, cfg.optim, **kwargs)


def _batches(n: int, seed: int, no_trained_tokens_at: int | None = None) -> torch.utils.data.DataLoader:
    """``n`` micro-batches of random tokens; batch ``no_trained_tokens_at`` has every label ignored, so
    its loss is 0 / 0 trained tokens: NaN, as real data without a trained token would give."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        ids = torch.randint(3, 1000, (2, 16), generator=gen)
        labels = torch.full_like(ids, IGNORE_INDEX) if i == no_trained_tokens_at else ids.clone()
        batches.append(
            {
                "input_ids": ids,
                "labels": labels,
                "token_mask": torch.ones_like(ids, dtype=torch.bool),
                "attention_mask": torch.ones_like(ids),
            }
        )
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _trainable(module: LitLoRA) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def _grad_norm(module: LitLoRA) -> float:
    grads = [p.grad for p in module.model.parameters() if p.requires_grad and p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


# ------------------------------------------------------------------------------- 1. the fp16 loss scaler
class StepRecorder(L.Callback):
    """Per optimizer step: the loss scale before and after, and the trainable weights before and after."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append({"scale": self.scaler.get_scale(), "before": _trainable(module)})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps[-1].update(scale_after=self.scaler.get_scale(), after=_trainable(module))


def test_fp16_overflow_is_left_to_the_loss_scaler_not_aborted(tmp_path, capsys):
    """A GradScaler starting at 2**24 overflows the fp16 backward of the first steps (here the tiny
    model's steps overflow down to a scale of 2**19): the scaler skips them and halves the scale each
    time, then steps train; on_nonfinite=abort must neither stop the run nor touch the gradients."""
    module = _tiny_module(tmp_path, on_nonfinite="abort")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    recorder = StepRecorder(scaler)
    steps = 12
    trainer = _trainer(
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=steps,
        gradient_clip_val=1.0,
        callbacks=[recorder],
    )
    trainer.fit(module, _batches(steps, seed=0))

    assert trainer.global_step == steps, "the run went to its end"
    skipped = [s for s in recorder.steps if s["scale_after"] < s["scale"]]
    taken = [s for s in recorder.steps if s["scale_after"] >= s["scale"]]
    assert recorder.steps[0] in skipped, "the first step overflowed at scale 2**24"
    assert module.scaler_skipped_steps == len(skipped) >= 1
    assert taken, "once the scale came down, steps train"
    for s in skipped:
        assert all(torch.equal(s["before"][k], s["after"][k]) for k in s["before"]), "a skipped step moved"
    for s in taken:
        assert any(not torch.equal(s["before"][k], s["after"][k]) for k in s["before"]), (
            "a step did not train"
        )
    assert module.skipped_steps == [] and module.nonfinite_skips == 0, "not counted as on_nonfinite skips"
    assert trainer.logged_metrics["train/scaler_skipped"] == len(skipped)
    assert capsys.readouterr().out.count("loss scaler found overflowing gradients") == 1, "reported once"


def test_fp16_loss_scale_collapse_stops_the_run(tmp_path, monkeypatch):
    """Gradients that stay infinite although the scale is down to 1.0 are not a scaling overflow: stop.

    The infinite gradient is the project's own fault injection (``inf_grad@N``), read once per process."""
    from lit_lora.training import faults

    monkeypatch.setenv(faults.ENV, "inf_grad@1")
    faults._faults.cache_clear()
    try:
        module = _tiny_module(tmp_path, on_nonfinite="skip")
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        trainer = _trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_steps=2)
        with pytest.raises(
            UserError,
            match=r"step 1: gradients are NaN or infinite although the fp16 loss scale is down to 1",
        ):
            trainer.fit(module, _batches(2, seed=0))
    finally:
        monkeypatch.delenv(faults.ENV)
        faults._faults.cache_clear()


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_a_nonfinite_loss_still_aborts(tmp_path, precision):
    """A batch without a trained token has the loss 0 / 0 = NaN: abort at its step, also under a scaler
    (the loss is checked before the scaler multiplies it)."""
    module = _tiny_module(tmp_path, on_nonfinite="abort")
    plugins = (
        [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
        if precision == "16-mixed"
        else []
    )
    trainer = _trainer(plugins=plugins, max_steps=3)
    with pytest.raises(UserError, match=r"step 2 \(batch 1 of epoch 0\): the training loss is nan;"):
        trainer.fit(module, _batches(3, seed=0, no_trained_tokens_at=1))
    assert trainer.global_step == 1


# ------------------------------------------------------------------------------- 2. FSDP norm clipping
def test_fsdp_norm_clipping_goes_through_fsdp_clip_grad_norm(tmp_path, monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; LitLoRA clips with the root FSDP module's
    own clip_grad_norm_ (gloo, world size 1, in this process)."""
    with pytest.raises(MisconfigurationException, match="not supported"):
        FSDPPrecision("32-true").clip_grad_by_norm(None, 1.0)  # what Lightning's default would do

    clip = 0.05  # below the tiny model's gradient norm (~0.6), so that every step clips

    class Norms(L.Callback):
        def __init__(self):
            self.before, self.after = [], []

        def on_before_optimizer_step(self, trainer, module, optimizer):  # runs before clipping
            self.before.append(_grad_norm(module))

        def on_train_batch_end(self, trainer, module, *args):  # gradients are zeroed at the next step
            self.after.append(_grad_norm(module))

    # Lightning's launcher and process-group setup write these into os.environ (LOCAL_RANK would make
    # later Trainers in this process believe they were started by torchrun, OMP_NUM_THREADS comes with a
    # torch.set_num_threads): set them first, so that monkeypatch restores them after the test.
    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NODE_RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }.items():
        monkeypatch.setenv(name, value)
    module = _tiny_module(tmp_path)
    strategy = CPUFSDPStrategy(auto_wrap_policy=decoder_layer_classes(module.model), use_orig_params=True)
    norms = Norms()
    trainer = _trainer(
        devices=1,
        strategy=strategy,
        precision="32-true",
        max_steps=2,
        gradient_clip_val=clip,
        callbacks=[norms],
    )
    try:
        trainer.fit(module, _batches(2, seed=0))
        assert isinstance(trainer.strategy.model, FSDP) and isinstance(
            trainer.precision_plugin, FSDPPrecision
        )
    finally:
        end_process_group(completed=False)
    assert trainer.global_step == 2
    assert all(b > clip for b in norms.before), norms.before
    assert all(abs(a - clip) < 1e-4 * clip for a in norms.after), norms.after


# ------------------------------------------------------------------------------- 3. ranks agree
def _rank_main(out: Path, strategy_name: str, on_nonfinite: str, nan_batch_rank: int) -> None:
    """One rank of a two-process run (``LOCAL_RANK`` etc. set by the test); writes ``rank<N>.json``."""
    rank = int(os.environ["LOCAL_RANK"])
    module = _tiny_module(out / f"cfg{rank}", on_nonfinite=on_nonfinite)
    steps = 3
    if strategy_name == "fsdp":
        strategy = CPUFSDPStrategy(
            auto_wrap_policy=decoder_layer_classes(module.model),
            use_orig_params=True,
            process_group_backend="gloo",
        )
    else:
        strategy = "ddp"
    trainer = _trainer(
        devices=2,
        strategy=strategy,
        precision="32-true",
        max_steps=steps,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
    )
    outcome: dict = {"rank": rank}
    completed = False
    try:
        trainer.fit(
            module,
            _batches(steps, seed=100 + rank, no_trained_tokens_at=1 if rank == nan_batch_rank else None),
        )
        completed = True
    except UserError as err:
        outcome["error"] = str(err)
    except Exception as err:
        outcome["other_error"] = f"{type(err).__name__}: {err}"
    finally:
        outcome.update(
            global_step=trainer.global_step,
            skipped_steps=module.skipped_steps,
            trainable=module.trainable_count(),
            local_trainable=sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        )
        (out / f"rank{rank}.json").write_text(json.dumps(outcome))
        end_process_group(completed=completed)


def _two_ranks(
    tmp_path: Path,
    strategy: str,
    on_nonfinite: str,
    nan_batch_rank: int = -1,
    faults: dict[int, str] | None = None,
) -> list[dict]:
    """Run :func:`_rank_main` as ranks 0 and 1 (``faults``: ``LIT_LORA_FAULTS`` per rank); their outcomes."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "LIT_LORA_FAULTS": (faults or {}).get(rank, ""),
            "PYTHONUNBUFFERED": "1",
        }
        args = [str(tmp_path), strategy, on_nonfinite, str(nan_batch_rank)]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.training.test_nonfinite", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = (
        time.monotonic() + 300
    )  # two cold starts share two busy cores; the other 2-rank runs allow 300 s
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outcomes = []
    for rank in (0, 1):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no outcome:\n" + "\n".join(x[-3000:] for x in logs)
        outcomes.append(json.loads(path.read_text()))
    for o in outcomes:
        assert "other_error" not in o, (o, [x[-3000:] for x in logs])
    return outcomes


def test_ddp_a_nan_loss_on_one_rank_stops_both_ranks_at_that_step(tmp_path):
    """Rank 1's second batch has no trained token (loss NaN), rank 0's is fine: both stop at step 2."""
    r0, r1 = _two_ranks(tmp_path, "ddp", "abort", nan_batch_rank=1)
    assert "step 2 (batch 1 of epoch 0): the training loss is nan on rank 1 of 2" in r1.get("error", ""), r1
    assert (
        "step 2 (batch 1 of epoch 0): the training loss is not finite on another rank (rank 0 of 2"
        in r0.get("error", "")
    ), r0
    assert r0["global_step"] == r1["global_step"] == 1


def test_fsdp_an_inf_gradient_in_one_rank_shard_is_skipped_by_both_ranks(tmp_path):
    """FSDP: each rank holds a shard of the gradients; an infinity in rank 0's shard only (fault
    ``inf_grad@2`` on rank 0; rank 1's shard of the adapter is empty) makes both ranks skip step 2. Clipping by norm (1.0) runs through FSDP's
    clip_grad_norm_ on both ranks; trainable_count() is the whole count on both, not a shard."""
    r0, r1 = _two_ranks(tmp_path, "fsdp", "skip", faults={0: "inf_grad@2"})
    for r in (r0, r1):
        assert "error" not in r, r
        assert r["global_step"] == 3 and r["skipped_steps"] == [2], r
    assert r0["trainable"] == r1["trainable"] == 7168
    # use_orig_params: a rank sees its shard of each parameter (here rank 0 holds the whole adapter).
    assert r0["local_trainable"] + r1["local_trainable"] == 7168
    assert min(r0["local_trainable"], r1["local_trainable"]) < 7168


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
