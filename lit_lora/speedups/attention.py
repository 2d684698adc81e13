"""lit-lora's attention function: per-example attention for packed batches, plain attention for short ones.

Two things transformers' SDPA path does slowly on a CPU, both measured (``make bench``,
``experiments/packing``):

- **Packed rows.** A packed row (position ids restarting at 0 for every example) gets a block-diagonal
  causal mask over the whole row and the full T x T product under it, so attention cost grows with the
  packed row length. A varlen kernel (flash-attention) would skip the off-diagonal blocks, but it is
  CUDA-only. When the forward call carries ``packed_segments`` (one tuple of segment start offsets per
  row, see :func:`segments_from_positions`), attention runs on each segment separately; the result
  equals the block-diagonal masked attention (pinned by ``tests/data/test_batching.py``).
- **Short sequences in 16-bit.** PyTorch's CPU flash kernel pays a fixed cost per block that dominates
  below a few hundred positions: for 4 x 96 positions in bf16 (SmolLM2 heads) its forward + backward
  took 6.8 ms against 2.4 ms for matmul-softmax-matmul. On a CPU, in bf16/fp16, a sequence or packed
  segment of at most ``eager_max_len`` positions (``speed.eager_attention_max_len``) takes that plain
  path, with the softmax in fp32 as transformers' eager attention does.

Everything else (fp32, CUDA, longer sequences, generation with a KV cache, attention dropout) goes to
transformers' own SDPA function unchanged, with the SDPA mask, so switching a model to
:data:`LIT_ATTENTION` changes nothing else.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

LIT_ATTENTION = "lit_lora"
_MAX_LEN_ATTR = "_lit_lora_eager_max_len"


def segments_from_positions(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Start offsets of the segments of each row of a packed batch: where the position id is 0.

    ``position_ids`` is (B, T); a row's first position is always a start. Padding at the end of a
    packed row restarts at 0 too (see :func:`lit_lora.data.batching.collate`), so it is a segment of its own.
    """
    starts = position_ids == 0
    starts[:, 0] = True
    return tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in starts)


def _plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """softmax(q k^T * scaling) v over (B, H, T, D) queries and (B, H_kv, T, D) keys/values; (B, H, T, D).

    ``allowed`` is None (every query sees every key), :data:`CAUSAL` (query i sees keys 0..i) or a boolean
    (T, T) or (B, 1, T, T) mask, True where a query may attend. A query allowed nothing gets a uniform
    distribution instead of NaN, as in transformers' eager attention.
    Grouped-query heads are not copied out: the G query heads sharing a key/value head are stacked
    along the sequence axis (head h reads key/value head h // G, as ``repeat_kv`` does), so each
    product is one batched matmul against the shared head. As transformers' eager attention: scores in
    the input's 16-bit dtype, scaled, masked with the dtype's minimum, softmax in fp32, probabilities
    cast back. Two CPU costs avoided (4 x 93 positions, SmolLM2 heads, forward + backward 2.26 ms ->
    1.57 ms causal): the causal mask is an additive bias folded into the score matmul (``baddbmm``)
    rather than a ``masked_fill`` pass, and the softmax writes fp32 (a bf16-output softmax took twice
    as long as an fp32-output one plus the cast).
    """
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    stacked = query.reshape(batch * kv_heads, groups * length, dim)
    key_t = key.reshape(batch * kv_heads, keys, dim).transpose(-1, -2)
    if allowed is CAUSAL and length > 1:
        bias = _causal_bias(length, groups, query.dtype, query.device)
        scores = torch.baddbmm(bias, stacked, key_t, alpha=scaling)
    else:
        scores = torch.bmm(stacked, key_t).mul_(scaling)
        if allowed is not None and allowed is not CAUSAL:
            blocked = ~(allowed[:, :, None] if allowed.dim() == 4 else allowed)
            scores.view(batch, kv_heads, groups, length, keys).masked_fill_(
                blocked, torch.finfo(scores.dtype).min
            )
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.bmm(probs, value.reshape(batch * kv_heads, keys, dim)).view(batch, heads, length, dim)


CAUSAL = object()  # the ``allowed`` of plain causal attention (a cached additive bias, see _causal_bias)


@functools.lru_cache(maxsize=64)
def _causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(G * T, T) additive causal mask for G stacked query heads: 0 on and below the diagonal, the
    dtype's minimum above (as a masked score in transformers' eager attention); cached per shape."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    bias = torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(
        blocked, torch.finfo(dtype).min
    )
    return bias.repeat(groups, 1)


def lit_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: tuple[tuple[int, ...], ...] | None = None,
    shared_prefix: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer: per packed segment, plain for short 16-bit CPU sequences, else SDPA.

    ``query`` is (B, H, T, D), ``key``/``value`` (B, H_kv, T, D). ``attention_mask`` is what
    transformers' ``sdpa_mask`` built: None (plain causal) or a boolean (B, 1, T, T), True = attend.
    The plain path's threshold is read from the layer (set by :func:`use_lit_attention`).
    Returns (B, T, H, D) like transformers' attention functions.

    ``shared_prefix`` = P > 0: row 0's first P positions are a prefix every row reads, so a batch of
    sequences that all start with it computes the prefix once, in the same forward, instead of a
    separate forward for a key/value cache (on a CPU a forward's fixed cost is streaming every weight
    once). Row 0's P keys/values are put in front of each row's own, and ``attention_mask`` is the
    caller's boolean (B, 1, T, P + T) over that layout (callbacks/retention.py builds it).
    """
    length = query.shape[2]
    if shared_prefix:
        rows = query.shape[0]
        key = torch.cat([key[:1, :, :shared_prefix].expand(rows, -1, -1, -1), key], dim=2)
        value = torch.cat([value[:1, :, :shared_prefix].expand(rows, -1, -1, -1), value], dim=2)
    max_len = getattr(module, _MAX_LEN_ATTR, 0)
    plain = (
        max_len > 0
        and query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and dropout == 0.0
        and (key.shape[2] == length or shared_prefix > 0)
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if packed_segments is None or key.shape[2] != length:
        if not (plain and length <= max_len):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        allowed = CAUSAL if attention_mask is None and causal else attention_mask
        out = _plain_attention(query, key, value, allowed, scale)
        return out.transpose(1, 2).contiguous(), None
    gqa = query.shape[1] != key.shape[1]

    def segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if plain and q.shape[1] <= max_len:
            return _plain_attention(q[None], k[None], v[None], CAUSAL, scale)[0]
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )[0]

    rows = []
    # unbind / split rather than indexing: their backward is one stack / cat, while each slice's backward
    # would zero-fill a gradient the size of the whole batch (quadratic in the number of segments).
    for q_row, k_row, v_row, starts in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), packed_segments, strict=True
    ):
        sizes = [e - s for s, e in itertools.pairwise([*starts, length])]
        parts = [
            segment(q, k, v)
            for q, k, v in zip(
                q_row.split(sizes, dim=1), k_row.split(sizes, dim=1), v_row.split(sizes, dim=1), strict=True
            )
        ]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`LIT_ATTENTION` (idempotent) and return its name."""
    AttentionInterface.register(LIT_ATTENTION, lit_attention_forward)
    # The mask for calls without segments is SDPA's; with segments it is built but not used.
    ALL_MASK_ATTENTION_FUNCTIONS.register(LIT_ATTENTION, sdpa_mask)
    return LIT_ATTENTION


def use_lit_attention(model, eager_max_len: int = 0) -> bool:
    """Switch ``model`` (a transformers or PEFT model) from ``sdpa`` to :data:`LIT_ATTENTION`.

    ``eager_max_len``: on a CPU in bf16/fp16, sequences and packed segments up to this length use
    plain matmul-softmax attention (0: never). Returns whether it switched: models on another
    implementation (``eager``, flash-attention, which has its own varlen path) are left alone.
    """
    if eager_max_len < 0:
        raise ValueError(f"eager_max_len must be >= 0, got {eager_max_len}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) not in ("sdpa", LIT_ATTENTION):
        return False
    base.set_attn_implementation(register())
    # Per layer rather than global, so two models in one process keep their own setting.
    for layer in base.modules():
        setattr(layer, _MAX_LEN_ATTR, eager_max_len)
    return True
