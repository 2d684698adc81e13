"""Training speed, counted from the batches themselves: tokens/s (all and trained), samples/s, step
time and, where the device's peak is known (CUDA), model FLOPs utilisation.

MFU = ``flops_per_token`` x steady tokens/s of this process / the device's dense peak FLOP/s for the
precision's matmul dtype. Its parts:

- the parameter counts are the whole model's, counted in :meth:`Throughput.setup`, which Lightning
  calls before the strategy wraps the model (``Trainer._run``: ``_call_setup_hook`` comes before
  ``strategy.setup``), so FSDP/DeepSpeed shards are not what is counted; 4-bit bitsandbytes weights
  count as their unpacked element number (:func:`lit_lora.models.builder.count_params`), not the packed
  storage (2 values per uint8 element, 4 per bf16, 8 per fp32 element);
- the peak is :func:`peak_flops`: this module's table of dense datasheet figures first (GPUs
  Lightning's table lacks or resolves to another GPU's entry), then Lightning's
  ``get_available_flops``; where neither knows the device, one warning says MFU is not reported.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from unittest import mock

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import nn

from lit_lora.data.rendering import IGNORE_INDEX
from lit_lora.models.builder import count_params

log = logging.getLogger(__name__)

# Dense peak FLOP/s (no 2:4 structured sparsity) per matmul dtype, for current data-centre GPUs that
# Lightning's table (lightning.fabric.utilities.throughput) lacks or maps to another GPU's entry.
# NVIDIA datasheets print the tensor-core figures with sparsity (starred) for Hopper and Ada: those are
# halved here. Keys match the lower-cased torch.cuda.get_device_name(); the first match wins, so the
# more specific names come first. A dtype left out of an entry is not reported (no guesses).
_TF32 = "tfloat32"
_DENSE_PEAKS: list[tuple[str, dict[torch.dtype | str, float]]] = [
    # NVIDIA GH200 Grace Hopper Superchip datasheet: FP32 67 TF; TF32 494 / BF16 990 / FP16 990 TF
    # dense (989 / 1,979 / 1,979 with sparsity); the GH100 of the H100 SXM, figures as Lightning's
    # "h100 sxm". Name e.g. "NVIDIA GH200 480GB" (Lightning: no entry).
    (
        r"\bgh200\b",
        {torch.float32: 66.9e12, _TF32: 494.7e12, torch.bfloat16: 989.4e12, torch.float16: 989.4e12},
    ),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column: FP32 60 TF; TF32 835, BF16 1,671,
    # FP16 1,671 TF with sparsity -> halved. Name "NVIDIA H200 NVL" (Lightning: no match).
    (
        r"\bh200\b.*\bnvl",
        {torch.float32: 60e12, _TF32: 417.5e12, torch.bfloat16: 835.5e12, torch.float16: 835.5e12},
    ),
    # Same datasheet, H200 SXM column: FP32 67 TF; TF32 989, BF16 1,979, FP16 1,979 TF with sparsity
    # -> halved (= H100 SXM, same GH100 and clocks). Name "NVIDIA H200" (Lightning: no match; its
    # "h200 sxm1"/"h200 nvl1" entries are the sparse figures and never match a real name).
    (
        r"\bh200\b",
        {torch.float32: 66.9e12, _TF32: 494.7e12, torch.bfloat16: 989.4e12, torch.float16: 989.4e12},
    ),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column: FP32 60 TF; TF32 835, BF16 1,671,
    # FP16 1,671 TF with sparsity -> halved. Name "NVIDIA H100 NVL". Overrides Lightning's "h100 nvl"
    # entry (bf16 1978.8e12: the sparse per-GPU figure, 2.4x the dense peak).
    (
        r"\bh100\b.*\bnvl",
        {torch.float32: 60e12, _TF32: 417.5e12, torch.bfloat16: 835.5e12, torch.float16: 835.5e12},
    ),
    # NVIDIA Blackwell datasheet (HGX B200: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs) -> 2.25 PF
    # dense per GPU. TF32/FP32 left out. "\b" keeps GB200 (other clocks) out. Lightning: no entry.
    (r"\bb200\b", {torch.bfloat16: 2.25e15, torch.float16: 2.25e15}),
    # NVIDIA L40S datasheet: FP32 91.6 TF; TF32 183, BF16 362.05, FP16 362.05 TF dense (366 / 733 /
    # 733 with sparsity). Lightning maps "NVIDIA L40S" to its L4 entry (121 TF).
    (
        r"\bl40s\b",
        {torch.float32: 91.6e12, _TF32: 183e12, torch.bfloat16: 362.05e12, torch.float16: 362.05e12},
    ),
    # NVIDIA L40 datasheet: FP32 90.5 TF; TF32 90.5, BF16 181.05, FP16 181.05 TF dense (Lightning's
    # "l40" figures, but it maps "NVIDIA L40" to its L4 entry unless the name says "Tesla").
    (
        r"\bl40\b",
        {torch.float32: 90.5e12, _TF32: 90.5e12, torch.bfloat16: 181.05e12, torch.float16: 181.05e12},
    ),
]


def _table_peak(device_name: str, dtype: torch.dtype | str) -> tuple[bool, float | None]:
    """(whether this module's table has the device, its dense peak for ``dtype`` or None)."""
    name = device_name.lower()
    for pattern, peaks in _DENSE_PEAKS:
        if re.search(pattern, name):
            return True, peaks.get(dtype)
    return False, None


def _lightning_peak(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Lightning's ``get_available_flops`` for a device called ``device_name``, without that device.

    Lightning reads the name from the device (``torch.cuda.get_device_name``) and, for float32, turns it
    into TF32 on its own; both are pinned here so that the answer depends on the arguments alone. Its
    "FLOPs not found" warning is left out: :class:`Throughput` says once that MFU is not reported.
    """
    from lightning.fabric.accelerators import cuda as lightning_cuda

    with (
        mock.patch.object(torch.cuda, "get_device_name", lambda *_args, **_kw: device_name),
        mock.patch.object(lightning_cuda, "_is_ampere_or_later", lambda *_args, **_kw: False),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        try:
            flops = get_available_flops(torch.device("cuda"), dtype)
        except (IndexError, KeyError, ValueError):  # a name its parser does not expect ("... GeForce RTX")
            return None
    return float(flops) if flops else None


def peak_flops(device_name: str, dtype: torch.dtype | str | None) -> float | None:
    """Dense peak FLOP/s of the CUDA device called ``device_name`` (``torch.cuda.get_device_name``) for
    matmuls in ``dtype`` (``torch.bfloat16``, ``torch.float16``, ``torch.float32`` or ``"tfloat32"``;
    see :func:`matmul_dtype`), or None when not known. This module's table first, then Lightning's."""
    if dtype is None:
        return None
    known, flops = _table_peak(device_name, dtype)
    if known:
        return flops
    return _lightning_peak(device_name, dtype)


def matmul_dtype(precision: str, float32_matmul_precision: str = "highest", tf32_capable: bool = False):
    """The dtype training's matmuls run in under Lightning precision ``precision`` (``trainer.precision``):
    ``bf16-mixed``/``bf16-true`` -> bfloat16, ``16-mixed``/``16-true`` -> float16, ``64-true`` ->
    float64; ``32-true`` -> ``"tfloat32"`` where TF32 is allowed
    (``torch.get_float32_matmul_precision() != "highest"``) on a device that has it (Ampere or later),
    else float32. None for other precisions (Transformer Engine's FP8): no peak is looked up."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    if precision.startswith("32"):
        return _TF32 if tf32_capable and float32_matmul_precision != "highest" else torch.float32
    return None


def lookup_params(model: nn.Module) -> int:
    """Elements of embedding tables that are only looked up, never multiplied: ``nn.Embedding`` weights
    (token and learned-position embeddings) that no other module uses. A token embedding tied to the
    output layer is that layer's matmul weight and is not counted here."""
    used_elsewhere = {
        id(module.weight)
        for module in model.modules()
        if not isinstance(module, nn.Embedding) and isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    return sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Embedding) and id(module.weight) not in used_elsewhere
    )


def flops_per_token(total_params: int, trainable_params: int, lookup_params: int = 0) -> int:
    """Training FLOPs per token of a LoRA model (attention scores left out).

    With N = ``total_params - lookup_params`` (the weights in matmuls; an embedding lookup costs no
    FLOPs): forward 2N; backward 2N for the activation gradients through every (frozen) weight, plus 2
    per trainable parameter for its weight gradient: 4N + 2N_trainable, where full fine-tuning costs 6N.
    Counts are the whole model's, 4-bit weights unpacked (:func:`lit_lora.models.builder.count_params`).
    """
    return 4 * (total_params - lookup_params) + 2 * trainable_params


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (non-padding tokens), ``perf/trained_tokens_per_s`` (tokens with a
    label), ``perf/samples_per_s``, ``perf/step_time_s`` and, on CUDA where the peak is known,
    ``perf/mfu``.

    The first ``warmup_steps`` optimizer steps are left out of the steady-state figures (allocator and
    kernel warm-up); validation time is left out too. ``total_params``/``trainable_params`` (4-bit
    weights unpacked) override the count taken in :meth:`setup`.
    """

    def __init__(
        self, warmup_steps: int = 2, total_params: int | None = None, trainable_params: int | None = None
    ):
        self.warmup_steps = warmup_steps
        self.given = (total_params, trainable_params)
        self.total_params, self.trainable_params = total_params, trainable_params
        self.lookup_params = 0
        self.warned_no_peak = False
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.trained = self.samples = 0
        self.steady_tokens = self.steady_trained = self.steady_samples = self.steady_steps = 0
        self.start = self.steady_start = None
        self.steady_end = None
        self.val_started = None
        self.val_pending = 0.0  # validation time not yet taken off the clocks
        self.last_batch_end = None
        self.peak_flops: float | None = None
        self.flops_per_token = 0

    def count(self, model: nn.Module) -> None:
        """Take the parameter counts from ``model``, whole (not sharded yet): see the module docstring."""
        trainable, total = count_params(model)
        given_total, given_trainable = self.given
        self.total_params = given_total if given_total is not None else total
        self.trainable_params = given_trainable if given_trainable is not None else trainable
        self.lookup_params = lookup_params(model)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before strategy.setup: FSDP (use_orig_params) and DeepSpeed ZeRO-3 have not sharded anything yet.
        self.count(pl_module)

    def peak_for(self, device_name: str, dtype, warn: bool = True) -> float | None:
        """:func:`peak_flops`, with one warning (per callback) where it is unknown."""
        flops = peak_flops(device_name, dtype)
        if flops is None and warn and not self.warned_no_peak:
            self.warned_no_peak = True
            log.warning(
                "perf/mfu is not reported: no dense peak FLOP/s known for %r with %s matmuls (neither "
                "Lightning's table nor callbacks/throughput.py's _DENSE_PEAKS has it)",
                device_name,
                dtype,
            )
        return flops

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        # steady_start moves past each warm-up step; with warmup_steps=0 the steady state is the whole run.
        self.start = self.steady_start = self.last_batch_end = time.perf_counter()
        if self.total_params is None or self.trainable_params is None:  # hook called without setup
            self.count(pl_module)
        self.flops_per_token = flops_per_token(self.total_params, self.trainable_params, self.lookup_params)
        device = pl_module.device
        if device.type == "cuda":
            dtype = matmul_dtype(
                trainer.precision,
                torch.get_float32_matmul_precision(),
                tf32_capable=torch.cuda.get_device_capability(device)[0] >= 8,
            )
            self.peak_flops = self.peak_for(
                torch.cuda.get_device_name(device), dtype, warn=trainer.is_global_zero
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_started = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation is not training throughput: the clocks skip the time it took, when the next
        # training batch ends. A validation after the last batch (the end of a run) lies outside the
        # steady window already; shifting the start past it would leave no window at all.
        if self.val_started is not None:
            self.val_pending += time.perf_counter() - self.val_started
        self.val_started = None

    def on_train_batch_end(
        self, trainer, pl_module, outputs, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        # GRPO's batches hold prompts; the module counts what it trained on (prompt + completion tokens,
        # completion tokens, prompts: perf/samples_per_s = prompts/s, rollouts and updates together).
        if "token_counts" in batch:
            tokens, trained, samples = batch["token_counts"]
        else:
            tokens = int(batch["token_mask"].sum())
            trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        # A packed row holds several examples: count the examples (position resets), not the rows; a
        # preference batch holds both sides of each pair: count the pairs (perf/samples_per_s = pairs/s).
        if "token_counts" in batch:
            pass
        elif "pairs" in batch:
            samples = int(batch["pairs"])
        elif "position_ids" in batch:
            samples = int((batch["position_ids"] == 0).logical_and(batch["token_mask"].bool()).sum())
        else:
            samples = int(batch["input_ids"].shape[0])
        self.tokens += tokens
        self.trained += trained
        self.samples += samples
        now = time.perf_counter()
        if self.val_pending:
            if self.steady_start is not None:
                self.steady_start += self.val_pending
            if self.last_batch_end is not None:
                self.last_batch_end += self.val_pending
            self.val_pending = 0.0
        step_time = now - (self.last_batch_end or now)
        self.last_batch_end = now
        if trainer.global_step < self.warmup_steps:
            self.steady_start = now
            return
        self.steady_tokens += tokens
        self.steady_trained += trained
        self.steady_samples += samples
        self.steady_steps += 1
        self.steady_end = now
        elapsed = now - self.steady_start
        if elapsed > 0:
            rates = {
                "perf/tokens_per_s": self.steady_tokens / elapsed,
                "perf/trained_tokens_per_s": self.steady_trained / elapsed,
                "perf/samples_per_s": self.steady_samples / elapsed,
                "perf/step_time_s": step_time,
            }
            if self.peak_flops:
                rates["perf/mfu"] = self.flops_per_token * self.steady_tokens / elapsed / self.peak_flops
            pl_module.log_dict(rates, on_step=True, on_epoch=False)

    def summary_metrics(self) -> dict:
        if self.start is None:
            return {}
        out = {"train_tokens": self.tokens, "trained_tokens": self.trained, "train_samples": self.samples}
        if (
            self.steady_end is not None
            and self.steady_start is not None
            and self.steady_end > self.steady_start
        ):
            elapsed = self.steady_end - self.steady_start
            out["tokens_per_s"] = round(self.steady_tokens / elapsed, 1)
            out["trained_tokens_per_s"] = round(self.steady_trained / elapsed, 1)
            out["samples_per_s"] = round(self.steady_samples / elapsed, 2)
            out["step_time_s"] = round(elapsed / max(self.steady_steps, 1), 3)
            out["flops_per_token"] = self.flops_per_token
            if self.peak_flops:
                out["peak_flops"] = self.peak_flops
                out["mfu"] = round(self.flops_per_token * self.steady_tokens / elapsed / self.peak_flops, 4)
        return out
