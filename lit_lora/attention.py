"""Segment attention for packed batches: each packed example attends only to itself, at its own cost.

transformers' SDPA path handles a packed row (position ids restarting at 0 for every example) by
building a block-diagonal causal mask over the whole row and computing the full T x T product under
it. On CPU that makes attention cost grow with the packed row length, which eats much of what packing
saves. A varlen kernel (flash-attention) would skip the off-diagonal blocks, but it is CUDA-only.

``PACKED_ATTENTION`` is an attention implementation registered with transformers' ``AttentionInterface``
that does the same on any device: when the forward call carries ``packed_segments`` (one tuple of
segment start offsets per row, see :func:`segments_from_positions`), it runs causal SDPA on each
segment separately and concatenates the outputs; the result equals the block-diagonal masked
attention (pinned by ``tests/test_batching.py``). Any call without ``packed_segments`` (plain padded
batches, validation of unpacked data, generation) goes to transformers' own SDPA function unchanged,
with the SDPA mask, so switching a model to it changes nothing else.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_ATTENTION = "lit_lora_packed"


def segments_from_positions(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Start offsets of the segments of each row of a packed batch: where the position id is 0.

    ``position_ids`` is (B, T); a row's first position is always a start. Padding at the end of a
    packed row restarts at 0 too (see :func:`lit_lora.batching.collate`), so it is a segment of its own.
    """
    starts = position_ids == 0
    starts[:, 0] = True
    return tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in starts)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: tuple[tuple[int, ...], ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention per packed segment; without ``packed_segments``, transformers' SDPA.

    ``query`` is (B, H, T, D), ``key``/``value`` (B, H_kv, T, D) (grouped-query heads are expanded by
    SDPA itself). Returns (B, T, H, D) like transformers' attention functions.
    """
    if packed_segments is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    length = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    rows = []
    # unbind / split rather than indexing: their backward is one stack / cat, while each slice's backward
    # would zero-fill a gradient the size of the whole batch (quadratic in the number of segments).
    for q_row, k_row, v_row, starts in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), packed_segments, strict=True
    ):
        sizes = [e - s for s, e in itertools.pairwise([*starts, length])]
        parts = [
            F.scaled_dot_product_attention(
                q[None], k[None], v[None], dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
            )[0]
            for q, k, v in zip(
                q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1), strict=True
            )
        ]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`PACKED_ATTENTION` (idempotent) and return its name."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    # The mask for calls without segments is SDPA's; with segments it is built but not used.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def use_packed_attention(model) -> bool:
    """Switch ``model`` (a transformers or PEFT model) from ``sdpa`` to :data:`PACKED_ATTENTION`.

    Returns whether it switched: models on another implementation (``eager``, flash-attention, which
    has its own varlen path) are left alone.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    base.set_attn_implementation(register())
    return True
