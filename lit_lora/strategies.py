"""Lightning strategies from ``trainer.strategy``: DDP, FSDP (with QLoRA), DeepSpeed ZeRO 2/3.

lit-lora has no distributed code of its own: every name maps to a Lightning strategy. Plain names
(``auto``, ``ddp``, ``ddp_spawn``, ``deepspeed_stage_2``...) go to ``lightning.Trainer`` unchanged.
``fsdp`` is built here because FSDP needs to know the model:

- the wrapping policy is per decoder layer (the model's ``_no_split_modules`` classes), so each layer's
  frozen base weights and adapter are sharded and gathered together;
- the mixed-precision policy computes in the quantization (or model) compute dtype and reduces
  gradients in float32;
- activation checkpointing (``model.gradient_checkpointing=true``) is applied by FSDP per decoder layer
  (non-reentrant), instead of transformers' own, which does not compose with FSDP's wrapping;
- for QLoRA the 4-bit storage dtype must equal the compute dtype (FSDP flattens parameters of one
  dtype): :func:`align_quant_storage` sets it before the model is loaded.

Adapter checkpoints under FSDP are gathered on every rank and written by rank zero (see
``LitLoRA.on_save_checkpoint``); they are the same PEFT-format files as on one device.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lit_lora.config import TrainConfig, require_deepspeed
from lit_lora.errors import UserError

DEEPSPEED = {"deepspeed_zero2": "deepspeed_stage_2", "deepspeed_zero3": "deepspeed_stage_3"}


def local_rank() -> int:
    """This process's device index on its node (torchrun, SLURM, or Lightning's own launcher)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_fsdp(name: str) -> bool:
    return name.startswith("fsdp")


def align_quant_storage(cfg: TrainConfig) -> str | None:
    """Under FSDP with a 4-bit base, make the 4-bit storage dtype the compute dtype; returns a note."""
    quant = cfg.quant
    if (
        is_fsdp(cfg.trainer.strategy)
        and quant.method in ("nf4", "fp4")
        and quant.storage_dtype != quant.compute_dtype
    ):
        before, quant.storage_dtype = quant.storage_dtype, quant.compute_dtype
        return f"FSDP: quant.storage_dtype {before} -> {quant.compute_dtype} (must equal the compute dtype)"
    return None


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The classes of ``model``'s decoder layers, from transformers' ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    classes = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not classes:
        raise UserError(
            f"trainer.strategy=fsdp: cannot find the decoder layers of {type(base).__name__} "
            "(no _no_split_modules); use trainer=ddp or a DeepSpeed strategy"
        )
    return classes


def build_strategy(cfg: TrainConfig, model: torch.nn.Module) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer`` for ``cfg.trainer.strategy``."""
    name = cfg.trainer.strategy
    if name in DEEPSPEED:
        require_deepspeed(name)
        return DEEPSPEED[name]
    if not is_fsdp(name):
        return name
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    layers = decoder_layer_classes(model)
    compute = getattr(torch, cfg.quant.compute_dtype if cfg.quant.enabled else cfg.model.dtype)
    if compute == torch.float32 and cfg.trainer.precision.startswith("bf16"):
        compute = torch.bfloat16
    return FSDPStrategy(
        auto_wrap_policy=layers,
        mixed_precision=MixedPrecision(param_dtype=compute, reduce_dtype=torch.float32, buffer_dtype=compute),
        activation_checkpointing_policy=layers if cfg.model.gradient_checkpointing else None,
        sharding_strategy="SHARD_GRAD_OP" if name == "fsdp_grad_op" else "FULL_SHARD",
        # Frozen and trainable parameters share flat parameters: keep the original ones visible.
        use_orig_params=True,
        state_dict_type="full",
    )
