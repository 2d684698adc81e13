"""Config keys that moved (the migration table): a run that still sets an old key is told where it went,
before Hydra composes (Hydra's own refusal would not say)."""

from __future__ import annotations

from lit_lora.errors import UserError

# Keys that moved to the speed group (issue 19); a run that still sets one is told where it went.
MOVED_KEYS = {
    "model.chunked_loss": "speed.chunked_loss",
    "model.bf16_frozen_linears": "speed.bf16_frozen_linears",
    "model.eager_attention_max_len": "speed.eager_attention_max_len",
    "model.right_padding_mask": "speed.right_padding_mask",
    "model.fused_rmsnorm": "speed.fused_rmsnorm",
    "lora.fast_dropout": "speed.fast_dropout",
    "lora.fused_linear": "speed.fused_lora_linear",
    "tune_host_allocator": "speed.tune_host_allocator",
}


def check_not_moved(key: str) -> None:
    """A :class:`UserError` naming the new key when ``key`` (dotted, from the command line or a YAML)
    is one that moved. The entry point checks ``argv`` with it before Hydra composes, since Hydra would
    refuse a plain ``model.fused_rmsnorm=false`` with its own message, which does not say where it went."""
    if key in MOVED_KEYS:
        raise UserError(f"{key} is now {MOVED_KEYS[key]} (the speed group, lit_lora.speedups)")
