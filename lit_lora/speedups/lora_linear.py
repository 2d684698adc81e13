"""A LoRA linear layer's training forward and backward as one autograd function (CPU).

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate modules: under autocast
that is about a dozen tensor operations and autograd nodes per adapted layer and direction (casts of
``x`` for the base and the adapter, the mask, two small matmuls, a scale, an add), many of them small
on a 135M model, where per-operation cost is a large part of a CPU step. :class:`_LoraLinear` computes
the same function with fewer, larger operations: ``x`` is cast to the compute dtype once, the LoRA scale
is folded into ``addmm`` (forward: ``addmm(base, h, B.T, alpha=scaling)``; backward: the frozen weight's
input gradient and the adapter's share one ``addmm``), the dropout scale ``1 / (1 - p)`` is folded into
``A``, and the mask is a 1.0 / 0.0 multiplier in the compute dtype built with integer operations
(:func:`lit_lora.speedups.dropout.keep_ones`: in bf16 a mask multiply costs ~50 us where the boolean mask of
``nn.Dropout``'s backward costs ~290 us for 372 x 576 elements). The forward saves the cast input
(one copy for q, k and v, which read the same hidden states), the multiplier and ``h = dropout(x) @ A.T``;
the backward multiplies the dropped input again. For q/k/v/o that is 6 tensors of the input's size per
decoder layer where PEFT's path keeps 8 (each layer's input and dropped input). Drawing the mask again
in the backward from the generator's saved state would keep 2, but measured 3 % slower per training
step of the default model (4 x 93 positions, LoRA dropout 0.05), so the multiplier is kept.

Numerics: the same products in the same dtype as PEFT's path under autocast; the mask and its scale
are applied after ``x``'s cast (PEFT scales in fp32, then casts), which moves results by about one bf16
rounding; in fp32 the two paths agree to fp32 rounding (tested). Masks are those of
``speed.fast_dropout`` (:mod:`lit_lora.speedups.dropout`): the same elements from the same generator state.

:func:`use_fused_lora_linear` routes a PEFT ``lora.Linear`` through it only when the call is plain LoRA
training on a CPU: grad enabled, module training, adapters enabled and unmerged, one active adapter, no
variant (DoRA), a plain frozen ``nn.Linear`` base (not 4-bit/8-bit; no trainable bias), no ``lora_B``
bias, no extra arguments, and one compute dtype
(autocast's, or that of ``x`` and all weights). Everything else takes PEFT's own forward, unchanged.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

from lit_lora.speedups.dropout import keep_mask, keep_ones, lane_threshold


def _compute_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype | None:
    """The one dtype PEFT's path computes base and adapter in: autocast's, or the common dtype of ``x``
    and the weights; None when they differ outside autocast (PEFT then mixes two dtypes: fall back)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype if all(w.dtype == x.dtype for w in weights) else None


def _keep_ones(flat: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A 1.0 / 0.0 keep multiplier for ``flat`` (its dtype; a CPU tensor) and the scale of kept elements:
    :mod:`lit_lora.speedups.dropout`'s masks, ``p`` on its 2**-15 grid."""
    threshold, scale = lane_threshold(p)
    if flat.dtype in (torch.bfloat16, torch.float16):
        return keep_ones(flat.shape, threshold, flat.dtype), scale
    return keep_mask(flat.shape, threshold).to(flat.dtype), scale


# The last input cast: (x, its version, dtype, the cast), all but the version weakly referenced.
_last_cast: tuple | None = None


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``(N, in)`` in ``dtype``; q, k and v read the same hidden states one after the other, so
    the cast of the previous call is reused while ``x`` is the same, unmodified tensor: the three layers
    save one copy of their input for the backward instead of three."""
    global _last_cast
    if _last_cast is not None:
        ref, version, cast_dtype, cast_ref = _last_cast
        cast = cast_ref()
        if ref() is x and version == x._version and cast_dtype == dtype and cast is not None:
            return cast
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    if flat is not x:  # a tensor cannot hold a weak reference to itself for us to compare
        _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(flat))
    return flat


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (dropout(x) @ A.T) @ B.T`` with gradients for ``x``, ``A`` and ``B``
    (``W`` and ``bias`` are frozen). Dropout is ``x * ones`` (``ones`` the 1.0 / 0.0 keep multiplier)
    with the ``1 / (1 - p)`` scale folded into ``A``; ``A``'s gradient carries the same scale."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype):
        # Every operand is cast to ``dtype`` here, so autocast (if on, ``dtype`` is its dtype) casts nothing.
        flat = _cast_input(x, dtype)
        w = weight.to(dtype)
        base = torch.nn.functional.linear(flat, w, None if bias is None else bias.to(dtype))
        ones, drop_scale, dropped = None, 1.0, flat
        if p > 0.0:
            ones, drop_scale = _keep_ones(flat, p)
            dropped = flat * ones
        a = (lora_a * drop_scale if drop_scale != 1.0 else lora_a).to(dtype)  # tiny: r x in
        b = lora_b.to(dtype)
        h = dropped @ a.T
        del dropped
        out = torch.addmm(base, h, b.T, alpha=scaling)
        # The dropped input is not kept: the backward multiplies again (one pass, cheaper than its memory).
        ctx.save_for_backward(flat, ones, h, w, a, b)
        ctx.scaling, ctx.drop_scale, ctx.x_dtype = scaling, drop_scale, x.dtype
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, ones, h, w, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        # (h.T @ g).T rather than g.T @ h: the same product, 37 vs 58 us for 372 x 576 rows on a CPU.
        grad_b = (h.T @ g).T.mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        gh = (g @ b).mul_(ctx.scaling)  # (N, r): the gradient of h
        grad_a = None
        if ctx.needs_input_grad[3]:
            dropped = flat if ones is None else flat * ones
            grad_a = (gh.T @ dropped).mul_(ctx.drop_scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            through_adapter = gh @ a
            if ones is not None:
                through_adapter.mul_(ones)
            grad_x = torch.addmm(through_adapter, g, w).view(*grad_out.shape[:-1], w.shape[1])
            grad_x = grad_x.to(ctx.x_dtype)
        a_dtype, b_dtype = ctx.lora_dtypes
        grad_a = None if grad_a is None else grad_a.to(a_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _trains_more_than_lora(layer, name: str) -> bool:
    """True when the call needs gradients :class:`_LoraLinear` does not give: a trainable base weight or
    bias (``lora.bias=all``), or a bias on ``lora_B`` (PEFT's ``lora_bias``)."""
    base = layer.base_layer
    trainable_base = base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
    return trainable_base or layer.lora_B[name].bias is not None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` through :class:`_LoraLinear` when the call is plain LoRA training."""
    peft_forward = type(self).forward
    adapters = self.active_adapters
    if (
        args
        or kwargs
        or not (self.training and torch.is_grad_enabled())
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in self.lora_variant
        or type(self.base_layer) is not nn.Linear
        or x.device.type != "cpu"  # measured on CPUs only; CUDA keeps PEFT's path
        or _trains_more_than_lora(self, adapters[0])
    ):
        return peft_forward(self, x, *args, **kwargs)
    name = adapters[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    dtype = _compute_dtype(x, base.weight, lora_a, lora_b)
    if dtype is None:
        return peft_forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    scaling = float(self.scaling[name])
    return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, scaling, float(p), dtype)


def use_fused_lora_linear(model: nn.Module) -> int:
    """Route every PEFT ``lora.Linear`` of ``model`` through :func:`_fused_forward`; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    routed = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            routed += 1
    return routed
