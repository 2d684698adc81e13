"""MFU's parts in callbacks/throughput.py: whole-model parameter counts (4-bit weights unpacked, taken
before a strategy shards the model), the dense peak FLOP/s of the device, the matmul dtype of the
trainer precision, and the FLOPs-per-token estimate."""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lit_lora.callbacks.throughput import Throughput, flops_per_token, lookup_params, matmul_dtype, peak_flops
from torch import nn

from lit_lora.config.schema import SpeedConfig, to_train_config
from lit_lora.models.builder import build_model
from tests.helpers import TINY, compose_train

BF16, FP16, FP32, TF32 = torch.bfloat16, torch.float16, torch.float32, "tfloat32"


def _build(tmp_path, *overrides):
    tc = to_train_config(compose_train([*TINY, f"output_dir={tmp_path}", *overrides]))
    return build_model(dataclasses.replace(tc, speed=SpeedConfig.off()))


@pytest.fixture(scope="module")
def unquantized_counts(tmp_path_factory):
    """(trainable, total) of the tiny Llama with the same adapter and no quantization: plain numel()."""
    model = _build(tmp_path_factory.mktemp("none"), "quant=none").model
    assert not any(type(p).__name__ == "Params4bit" for p in model.parameters())
    return (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.bnb
@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_4bit_weights_count_as_the_unquantized_model_not_the_packed_storage(
    tmp_path, unquantized_counts, storage
):
    """bitsandbytes packs 2 4-bit values per uint8 element (4 per bf16, 8 per fp32): numel() undercounts."""
    pytest.importorskip("bitsandbytes")
    built = _build(tmp_path, "quant=nf4", f"quant.storage_dtype={storage}")
    quantized = [p for p in built.model.parameters() if type(p).__name__ == "Params4bit"]
    assert quantized and all(p.dtype == getattr(torch, storage) for p in quantized)
    packed_total = sum(p.numel() for p in built.model.parameters())
    callback = Throughput()
    callback.setup(None, built.model, "fit")
    assert (callback.trainable_params, callback.total_params) == unquantized_counts
    assert callback.total_params > packed_total
    # The first CPU forward repacks uint8 weights into the CPU kernel's layout: the count stays.
    if storage == "uint8":
        with torch.no_grad():
            built.model(input_ids=torch.tensor([[1, 5, 9, 2]]))
        callback.setup(None, built.model, "fit")
        assert (callback.trainable_params, callback.total_params) == unquantized_counts


def test_counts_given_to_the_callback_win_over_its_own():
    callback = Throughput(total_params=7_000, trainable_params=30)
    callback.setup(None, nn.Linear(4, 4), "fit")
    assert (callback.total_params, callback.trainable_params) == (7_000, 30)


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        ids = torch.arange(8)
        return {"input_ids": ids, "labels": ids, "token_mask": torch.ones(8, dtype=torch.long)}


class _Frozen(L.LightningModule):
    """A frozen 64x64 base (what the strategy shards) and a trainable head (what trains)."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(64, 64, bias=False).requires_grad_(False)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return self.head(batch["input_ids"].float()).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


class _ShardingStrategy(SingleDeviceStrategy):
    """Lightning's one-device strategy, then what rank 0 of 2 holds under FSDP with use_orig_params=True:
    each parameter a 1-D view of its half of the flat parameter. (Lightning's FSDPStrategy refuses
    accelerator='cpu' and torch's FSDP needs an accelerator device, so the shard is made by hand; the
    hook order is Lightning's own.)"""

    def setup(self, trainer):
        self.seen_by_callback_at_wrap = trainer.callbacks[0].total_params
        super().setup(trainer)
        weight = self.lightning_module.base.weight
        self.lightning_module.base.weight = nn.Parameter(
            weight.detach().flatten()[: weight.numel() // 2], False
        )


class _LocalCount(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.local = sum(p.numel() for p in pl_module.parameters())


def test_counts_are_the_whole_models_taken_before_the_strategy_shards_it(tmp_path):
    module = _Frozen()
    full = sum(p.numel() for p in module.parameters())
    throughput, local = Throughput(warmup_steps=0), _LocalCount()
    strategy = _ShardingStrategy(device=torch.device("cpu"))
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        callbacks=[throughput, local],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(_Rows(), batch_size=2))
    assert strategy.seen_by_callback_at_wrap == full, "Callback.setup runs before strategy.setup"
    assert local.local == full - 64 * 64 // 2, "the module holds a shard at on_train_start"
    assert (throughput.total_params, throughput.trainable_params) == (full, 9)
    assert throughput.flops_per_token == flops_per_token(full, 9) == 4 * full + 18
    summary = throughput.summary_metrics()
    assert summary["flops_per_token"] == 4 * full + 18 and summary["tokens_per_s"] > 0  # warmup_steps=0


# ---------------------------------------------------------------------------------------------- FLOPs/token
def test_flops_per_token_leaves_out_embedding_lookups_but_not_a_tied_output_layer():
    tied = nn.ModuleDict(
        {"embed": nn.Embedding(100, 8), "pos": nn.Embedding(16, 8), "lm_head": nn.Linear(8, 100)}
    )
    tied["lm_head"].weight = tied["embed"].weight  # the output matmul uses the token table
    untied = nn.ModuleDict({"embed": nn.Embedding(100, 8), "lm_head": nn.Linear(8, 100, bias=False)})
    assert lookup_params(tied) == 16 * 8  # position table only
    assert lookup_params(untied) == 100 * 8
    assert flops_per_token(1_000, 10, lookup_params=200) == 4 * 800 + 20
    assert flops_per_token(100, 10) == 420


@pytest.mark.bnb
def test_tiny_llama_untied_embeddings_are_lookups(tmp_path):
    pytest.importorskip("bitsandbytes")
    untied = _build(tmp_path, "quant=nf4", "model.config_overrides.tie_word_embeddings=false").model
    callback = Throughput()
    callback.setup(None, untied, "fit")
    assert callback.lookup_params == 49152 * 64  # the input token table; the separate lm_head multiplies


# ---------------------------------------------------------------------------------------------- peak FLOP/s
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # this module's table (dense NVIDIA datasheet figures; see _DENSE_PEAKS)
        ("NVIDIA H200", {BF16: 989.4e12, FP16: 989.4e12, TF32: 494.7e12, FP32: 66.9e12}),
        ("NVIDIA H200 NVL", {BF16: 835.5e12, FP16: 835.5e12, TF32: 417.5e12, FP32: 60e12}),
        ("NVIDIA H100 NVL", {BF16: 835.5e12, TF32: 417.5e12}),
        ("NVIDIA GH200 480GB", {BF16: 989.4e12, TF32: 494.7e12}),
        ("NVIDIA B200", {BF16: 2.25e15, FP16: 2.25e15, FP32: None}),
        ("NVIDIA L40S", {BF16: 362.05e12, TF32: 183e12, FP32: 91.6e12}),
        ("NVIDIA L40", {BF16: 181.05e12, FP32: 90.5e12}),
        # Lightning's table, reached by name
        ("NVIDIA L4", {BF16: 121e12, TF32: 60e12}),
        ("NVIDIA H100 80GB HBM3", {BF16: 989.4e12, TF32: 494.7e12, FP32: 66.9e12}),
        ("NVIDIA A100-SXM4-80GB", {BF16: 312e12, TF32: 156e12, FP32: 19.5e12}),
        ("Tesla T4", {FP16: 65e12, BF16: None}),
    ],
)
def test_peak_flops_by_device_name_and_dtype(name, expected):
    for dtype, flops in expected.items():
        assert peak_flops(name, dtype) == flops, (name, dtype)


def test_unknown_device_gives_none_and_one_warning_naming_it(caplog):
    for name in ("NVIDIA H20", "NVIDIA GB200", "NVIDIA GeForce RTX", "Some Accelerator 9000"):
        assert peak_flops(name, BF16) is None
    callback = Throughput()
    with caplog.at_level(logging.WARNING, logger="lit_lora.callbacks.throughput"):
        assert callback.peak_for("NVIDIA H20", BF16) is None
        assert callback.peak_for("NVIDIA H20", BF16) is None
        assert callback.peak_for("NVIDIA H200", BF16) == 989.4e12
    warned = [r.getMessage() for r in caplog.records if r.name == "lit_lora.callbacks.throughput"]
    assert len(warned) == 1 and "'NVIDIA H20'" in warned[0] and "perf/mfu is not reported" in warned[0]
    caplog.clear()
    assert Throughput().peak_for("NVIDIA H20", BF16, warn=False) is None  # ranks other than zero
    assert not caplog.records


@pytest.mark.parametrize(
    ("precision", "matmul_precision", "tf32_capable", "dtype"),
    [
        ("bf16-mixed", "highest", True, BF16),
        ("bf16-true", "high", True, BF16),
        ("16-mixed", "highest", True, FP16),
        ("16-true", "highest", False, FP16),
        ("32-true", "highest", True, FP32),
        ("32-true", "high", True, TF32),
        ("32-true", "medium", True, TF32),
        ("32-true", "high", False, FP32),  # before Ampere: no TF32
        ("32", "high", True, TF32),
        ("64-true", "highest", True, torch.float64),
        ("transformer-engine", "highest", True, None),
    ],
)
def test_matmul_dtype_follows_the_trainer_precision(precision, matmul_precision, tf32_capable, dtype):
    assert matmul_dtype(precision, matmul_precision, tf32_capable) == dtype
