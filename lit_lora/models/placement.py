"""Where a model's weights go, decided from the config alone (pure functions, tested without GPUs): the
CUDA device of this rank, and the 4-bit storage dtype a base built for FSDP needs. The builder places the
weights with them; :mod:`lit_lora.training.strategies` builds the matching Lightning strategy."""

from __future__ import annotations

from typing import Any

from lit_lora.config.schema import QuantConfig


def is_fsdp(name: str) -> bool:
    return name.startswith("fsdp")


def cuda_index_for(accelerator: str, devices: Any, rank: int, cuda_available: bool) -> int | None:
    """The CUDA device index this process trains on (where a quantized base must be loaded), or None
    for the CPU. ``trainer.devices`` as Lightning reads it: a count (ranks take GPUs 0..n-1), a list of
    indices or a string ``"2,3"`` (rank ``r`` takes the ``r``-th listed), ``-1`` / ``"auto"`` (rank ``r``
    takes GPU ``r``). A pure function, so that the mapping is tested without GPUs."""
    if not cuda_available or str(accelerator) not in ("auto", "gpu", "cuda"):
        return None
    listed: list[int] | None = None
    if isinstance(devices, (list, tuple)):
        listed = [int(d) for d in devices]
    elif isinstance(devices, str) and "," in devices:
        listed = [int(d) for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit() and devices.strip() != "-1":
        devices = int(devices)
    if listed:
        return listed[rank] if rank < len(listed) else listed[-1]
    return rank


def sharded_storage_dtype(quant: QuantConfig) -> str:
    """The 4-bit storage dtype a base built for FSDP uses: the compute dtype, which the decoder layer's
    other weights are stored in (FSDP flattens one dtype per unit); packed 4-bit bytes take the same
    memory in any storage dtype. Any other quantization keeps ``quant.storage_dtype``."""
    return quant.compute_dtype if quant.method in ("nf4", "fp4") else quant.storage_dtype
