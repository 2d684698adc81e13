"""Frozen linear weights stored in bf16 when training runs under bf16 autocast (``speed.bf16_frozen_linears``)."""

from __future__ import annotations

import torch
from torch import nn


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights of the base's ``nn.Linear`` layers (not LoRA's, not norms or embeddings)
    in ``dtype``; returns how many were cast.

    Under bf16 autocast every matmul casts its fp32 weight to bf16 anyway, and for frozen weights
    autocast cannot cache the cast: it is redone in every forward and backward. Storing them in bf16
    gives the same matmul inputs bit for bit, without the casts and with half the memory. Norms and
    embeddings (the residual stream) and the trainable adapter stay fp32.
    """
    count = 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:  # often tied to the input embeddings, which must keep their dtype
            continue
        frozen = type(module) is nn.Linear and "lora_" not in name and not module.weight.requires_grad
        if frozen and module.weight.dtype != dtype and module.weight.dtype.is_floating_point:
            module.to(dtype)
            count += 1
    return count
