"""lit-lora's own training paths, each a switch of the ``speed`` config group (:class:`SpeedConfig`).

Every path computes what plain transformers + PEFT compute (each has an equality test) and was kept
because it measured faster or leaner on a CPU (``make bench-paths`` times each against ``speed=off``):

- :mod:`.attention`: per-example attention for packed rows, plain attention for short 16-bit rows;
- :mod:`.chunked_loss`: the loss over trained positions only, in chunks (used by ``LitLoRA``);
- :mod:`.frozen_linears`: frozen linear weights stored in bf16 under bf16 autocast;
- :mod:`.dropout`: cheaper LoRA dropout masks;
- :mod:`.lora_linear`: one autograd function per LoRA linear layer;
- :mod:`.rmsnorm`: one autograd function per Llama-family RMSNorm;
- :mod:`.swiglu`: the SiLU-gated MLP product with the SiLU recomputed in the backward (less memory);
- :mod:`.allocator`: glibc malloc thresholds.

:func:`apply_speedups` is the one place that decides which of them a built model gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_lora.config.schema import SpeedConfig


@dataclass(frozen=True)
class Speedups:
    """What :func:`apply_speedups` changed on a model (counts of modules switched)."""

    frozen_linears_bf16: int = 0
    fast_dropout: int = 0
    fused_lora_linear: int = 0
    fused_rmsnorm: int = 0
    fused_swiglu: int = 0
    lit_attention: bool = False
    host_allocator: bool = False

    @property
    def on(self) -> bool:
        """Whether any path changed the model or the process (False: plain transformers + PEFT)."""
        return any(
            (
                self.frozen_linears_bf16,
                self.fast_dropout,
                self.fused_lora_linear,
                self.fused_rmsnorm,
                self.fused_swiglu,
                self.lit_attention,
                self.host_allocator,
            )
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast a forward outside Lightning needs: bf16 when frozen linears are stored in bf16."""
        return torch.bfloat16 if self.frozen_linears_bf16 else None


def apply_speedups(
    model: torch.nn.Module, speed: SpeedConfig, *, lora_dropout: float, bf16_autocast: bool, sharded: bool
) -> Speedups:
    """Put the switched-on paths of ``speed`` on a freshly built PEFT ``model``; returns what changed.

    ``bf16_autocast``: training runs under bf16 autocast with an unquantized base (the frozen-linear
    cast is exact only then). ``sharded`` (FSDP) keeps the dtypes the builder chose (no bf16 cast of
    frozen linears) and PEFT's LoRA forward, which calls the LoRA modules FSDP wraps (the fused path
    reads their weights directly, which are shards outside a unit's forward). The fused LoRA linear
    draws ``fast_dropout``'s masks, so it is used only with ``fast_dropout`` or without dropout.
    """
    from lit_lora.speedups.allocator import tune_host_allocator
    from lit_lora.speedups.attention import use_lit_attention
    from lit_lora.speedups.dropout import use_fast_dropout
    from lit_lora.speedups.frozen_linears import cast_frozen_linears
    from lit_lora.speedups.lora_linear import use_fused_lora_linear
    from lit_lora.speedups.rmsnorm import use_fused_rmsnorm
    from lit_lora.speedups.swiglu import use_fused_swiglu

    cast = fast = fused = norms = mlps = 0
    if speed.bf16_frozen_linears and bf16_autocast and not sharded:
        cast = cast_frozen_linears(model, torch.bfloat16)
    if speed.fast_dropout:
        fast = use_fast_dropout(model)
    if speed.fused_lora_linear and (speed.fast_dropout or lora_dropout == 0.0) and not sharded:
        fused = use_fused_lora_linear(model)
    if speed.fused_rmsnorm:
        norms = use_fused_rmsnorm(model)
    if speed.fused_swiglu:
        mlps = use_fused_swiglu(model)
    attention = speed.eager_attention_max_len is not None and use_lit_attention(
        model, speed.eager_attention_max_len
    )
    allocator = speed.tune_host_allocator and tune_host_allocator()
    return Speedups(cast, fast, fused, norms, mlps, attention, allocator)
