"""The sharded (FSDP) path, on the CPU: dtypes FSDP can flatten, clipping, adapter checkpoints and resume,
scoring and the device the base loads on (issue 18).

FSDP normally runs on GPUs; ``trainer=fsdp trainer.accelerator=cpu`` runs the same Lightning strategy
with gloo on the CPU, so that the strategy, the model built for it and the checkpoint path are exercised
here by real processes, not by a stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from safetensors.torch import load_file

from lit_lora.config.schema import to_train_config
from lit_lora.models.builder import build_model
from lit_lora.models.placement import cuda_index_for
from lit_lora.training.strategies import (
    check_uniform_units,
    flat_param_dtypes,
    fsdp_wrap_policy,
    scoring_device,
)
from tests.helpers import DPO, EXACT, compose_train, run_cli

FSDP_CPU = [
    "model=tiny",
    "trainer=fsdp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.train_size=64",
    "data.val_size=8",
    "data.test_size=4",
    "data.score_max_new_tokens=4",
]


def _built(tmp_path, *overrides, sharded: bool):
    strategy = ["trainer.strategy=fsdp"] if sharded else []
    cfg = to_train_config(compose_train(["model=tiny", f"output_dir={tmp_path}", *strategy, *overrides]))
    return build_model(cfg).model


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_every_fsdp_unit_of_the_model_built_for_fsdp_has_one_dtype(tmp_path, quant):
    model = _built(tmp_path, f"quant={quant}", "model.dtype=bfloat16", sharded=True)
    units = flat_param_dtypes(model, fsdp_wrap_policy(model))
    assert all(len(dtypes) == 1 for dtypes in units.values()), units
    check_uniform_units(model, fsdp_wrap_policy(model))
    # The adapter keeps float32 storage in units of its own; the base is in the compute dtype.
    lora_units = {path: d for path, d in units.items() if "lora_" in path}
    assert lora_units and all(d == {torch.float32} for d in lora_units.values())
    layer_units = {path: d for path, d in units.items() if path.endswith(("layers.0", "layers.1"))}
    assert len(layer_units) == 2 and all(d == {torch.bfloat16} for d in layer_units.values())


def test_the_single_device_build_would_mix_dtypes_under_fsdp_so_the_check_can_fail(tmp_path):
    # prepare_model_for_kbit_training upcasts norms to float32 beside 4-bit storage: what FSDP refused
    # on an H200 ("Must flatten tensors with uniform dtype but got torch.bfloat16 and torch.float32").
    model = _built(tmp_path, "quant=nf4", sharded=False)
    with pytest.raises(RuntimeError, match="would mix dtypes"):
        check_uniform_units(model, fsdp_wrap_policy(model))


def test_fsdp_build_leaves_activation_checkpointing_to_fsdp(tmp_path):
    """One checkpointing mechanism: with FSDP, transformers' own stays off (FSDP wraps each layer)."""
    sharded = _built(tmp_path, "quant=nf4", "model.gradient_checkpointing=true", sharded=True)
    single = _built(tmp_path, "quant=nf4", "model.gradient_checkpointing=true", sharded=False)
    assert single.base_model.model.is_gradient_checkpointing
    assert not sharded.base_model.model.is_gradient_checkpointing


@pytest.mark.parametrize(
    ("accelerator", "devices", "rank", "cuda", "expected"),
    [
        ("auto", 1, 0, True, 0),
        ("gpu", 4, 3, True, 3),
        ("gpu", [2], 0, True, 2),  # trainer.devices=[k]: GPU k, not GPU 0
        ("gpu", [2, 5], 1, True, 5),
        ("cuda", "1,3", 1, True, 3),
        ("auto", "auto", 1, True, 1),
        ("auto", -1, 2, True, 2),
        ("cpu", 1, 0, True, None),  # trainer=cpu on a GPU host: the quantized base loads on the CPU
        ("auto", 1, 0, False, None),
    ],
)
def test_the_base_loads_on_the_gpu_this_rank_trains_on(accelerator, devices, rank, cuda, expected):
    assert cuda_index_for(accelerator, devices, rank, cuda) == expected


def test_a_quantized_base_on_a_gpu_host_loads_where_the_rank_trains():
    from lit_lora.models.builder import quantized_device_map

    assert quantized_device_map(2, cuda_available=True) == {"": 2}
    # trainer.accelerator=cpu on a GPU host: the CPU, said explicitly (transformers would pick cuda:0).
    assert quantized_device_map(None, cuda_available=True) == {"": "cpu"}
    assert quantized_device_map(None, cuda_available=False) is None


def test_scoring_runs_on_the_training_device_and_not_under_fsdp():
    # After fit, Lightning's teardown has moved the module to the CPU; the strategy still names the
    # device training used. A sharded strategy gets None: scoring is skipped with a message.
    assert scoring_device(SingleDeviceStrategy(device=torch.device("cpu"))) == torch.device("cpu")
    assert scoring_device(FSDPStrategy()) is None


def _b_weights(run: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_B" in k}


@pytest.mark.slow
def test_fsdp_qlora_dpo_on_two_cpu_ranks_trains_and_saves(tmp_path):
    """Two gloo ranks, nf4 base, FSDP's activation checkpointing, the default gradient_clip_val=1.0 and
    checkpoints every 2 steps (``last.ckpt`` replaced twice): Lightning's own FSDP save refuses an existing
    folder and its precision plugin refuses norm clipping. The objective is DPO, whose reference (the
    adapter switched off) runs inside the same sharded step; FSDP with SFT trains in the test below."""
    first = tmp_path / "first"
    done = run_cli(
        *FSDP_CPU, *DPO, "quant=nf4", "model.gradient_checkpointing=true", "trainer.max_steps=4",
        f"output_dir={first}", timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "FSDP activation checkpointing on 2 decoder layers" in done.stdout
    assert "storage_dtype: bfloat16" in (first / "config.yaml").read_text(), "config.yaml shows what ran"
    assert "held-out scoring skipped: under fsdp" in done.stdout
    summary = json.loads((first / "summary.json").read_text())
    assert summary["global_step"] == 4 and "score_tuned" not in summary
    # The last validation's DPO figures, over both ranks: the trained adapter moved off the reference.
    assert summary["objective"]["name"] == "dpo" and summary["preference"]["rewards_margin"] != 0
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == [
        "last.ckpt", "step-000002.ckpt", "step-000004.ckpt"
    ]  # fmt: skip
    trained = _b_weights(first)
    assert len(trained) == 8 and all(t.abs().max() > 0 for t in trained.values()), "LoRA B trained"
    # The checkpoint holds the adapter and the optimizer moments, never the base.
    state = json.loads((first / "checkpoints" / "step-000002.ckpt" / "state.json").read_text())
    assert state["state_dict"] == {} and state["optimizer_states"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_checkpoints_move_between_one_device_and_fsdp_and_resume_exactly(reference_run, tmp_path):
    """The one-process reference run (micro-batch 8, 4 steps, tests/conftest.py) is the yardstick. FSDP on
    2 ranks (micro-batch 4) resumed from its step-2 checkpoint ends where it ends; a second FSDP run
    resumed from the first FSDP run's step-3 checkpoint ends where that one ends. A wrong optimizer moment
    on resume (Lightning numbers them by position in the whole model) or an adapter not restored would
    show here."""
    every_step = [
        "callbacks.adapter_checkpoint.every_n_train_steps=1",
        "callbacks.adapter_checkpoint.monitor=null",
        "callbacks.adapter_checkpoint.save_top_k=-1",
    ]
    fsdp = [
        *EXACT,
        *every_step,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=4",
    ]
    single = reference_run.out
    moved = tmp_path / "moved"
    resume = f"resume={single / 'checkpoints' / 'step-000002.ckpt'}"
    done = run_cli(*fsdp, f"output_dir={moved}", resume, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_adapter(moved), _adapter(single)) < 1e-5
    again = tmp_path / "again"
    resume = f"resume={moved / 'checkpoints' / 'step-000003.ckpt'}"
    done = run_cli(*fsdp, f"output_dir={again}", resume, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((again / "summary.json").read_text())["global_step"] == 4
    assert _max_diff(_adapter(again), _adapter(moved)) < 1e-6


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))
