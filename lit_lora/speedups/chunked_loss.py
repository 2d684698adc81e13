"""Chunked cross-entropy over the trained positions only, without full-vocabulary logits.

transformers' causal-LM loss computes logits for every position of the batch (B x T x vocab; SmolLM2's
vocabulary is 49,152), upcasts them to fp32 and keeps them for the backward pass, although prompt,
padding and packed-boundary positions have no label. :func:`trained_token_loss` instead runs the
decoder, keeps the hidden states of the positions whose next token is trained, and computes the loss
over them in chunks: each chunk's logits exist only while the chunk is processed, and the gradient
with respect to the hidden states is formed right away (``softmax - one_hot``, times the output
weight), so no logits are kept for backward. The output layer must be frozen (it is, unless LoRA
targets ``lm_head``); :func:`supports_chunked_loss` says when the path applies and callers fall back
to transformers' loss otherwise.
"""

from __future__ import annotations

import torch

from lit_lora.data.rendering import IGNORE_INDEX

# Positions per chunk: 128 x 49,152 fp32 logits = 24 MiB at a time, under glibc's largest mmap threshold
# (lit_lora.speedups.allocator), so chunk buffers are reused from the heap instead of page-faulted in anew; 128 was
# the fastest of 64-1024 in a CPU micro-benchmark (900 rows: 2225-2482 rows/s vs 1897 at 1024).
CHUNK_ROWS = 128
_CAST_ATTR = "_lit_lora_cast"


def _frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, cast once and kept on the weight for the following steps.

    The output layer is frozen, so its cast is the same every step; with tied embeddings it stays in
    the model's dtype (fp32), and casting SmolLM2's 49,152 x 576 weight took 22 ms, about 2.5 % of a
    CPU step. The copy is rebuilt when the weight changes in place (its version counter moves) or
    is reallocated; it is a detached copy, never a parameter.
    """
    if weight.dtype == dtype:
        return weight
    key = (weight._version, weight.data_ptr(), dtype)
    cached = getattr(weight, _CAST_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cast = weight.detach().to(dtype)
    setattr(weight, _CAST_ATTR, (key, cast))
    return cast


class _FrozenLinearLogProbs(torch.autograd.Function):
    """``log_softmax(hidden[i] @ weight.T)[targets[i]]`` for every row i, in chunks; the gradient flows to
    ``hidden`` only.

    Each row's gradient ``d logp_i / d hidden_i = (one_hot - softmax) @ weight`` is formed in the forward,
    while the chunk's logits exist, and kept (rows x hidden size, no vocabulary dimension); backward
    scales row i by the incoming gradient of ``logp_i``. A sum of all rows is the token loss of SFT,
    per-sequence sums are the answer log-probs of a preference pair.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, scale: float = 1.0
    ):
        device = hidden.device.type
        # The matmuls run in the autocast dtype when autocast is on (as lm_head would), else as stored.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = _frozen_cast(weight, dtype)  # not per chunk, nor per step
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            # One fused log-softmax rather than logsumexp (max, exp, sum, log as separate passes) and a
            # second exp: 10.5 vs 20.2 ms for 123 x 49,152 fp32 logits on a CPU.
            logits = (h @ w.T).float()
            if scale != 1.0:  # logits / temperature (GRPO scores tokens as they were sampled)
                logits = logits * scale
            log_probs = torch.log_softmax(logits, dim=-1)
            out[start : start + chunk] = log_probs.gather(1, t[:, None])[:, 0]
            if grad is not None:
                probs = log_probs.exp_()  # in place: the chunk's only big buffer
                probs[torch.arange(len(t), device=t.device), t] -= 1
                # (softmax - one_hot) @ W: the gradient of -logp; backward flips the sign.
                grad[start : start + chunk] = (probs.to(dtype) @ w).to(grad.dtype)
                if scale != 1.0:
                    grad[start : start + chunk] *= scale
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * -grad_out.to(grad.dtype)[:, None], None, None, None, None


def _parts(model):
    """``(decoder, lm_head)`` of a PEFT or transformers causal LM, or None when they cannot be found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (base, decoder, head) if decoder is not None and head is not None else None


def supports_chunked_loss(model) -> bool:
    """True when the model's logits are exactly ``lm_head(decoder(...))`` with a frozen, plain weight.

    Models that scale or soft-cap logits, a bias on the output layer, a LoRA-adapted or quantized
    ``lm_head``: all take transformers' own loss.
    """
    parts = _parts(model)
    if parts is None:
        return False
    base, _, head = parts
    config = base.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (
        None,
        1.0,
    ):
        return False
    weight = getattr(head, "weight", None)
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and weight is not None
        and not weight.requires_grad
        and weight.dtype.is_floating_point
    )


def position_logits(model, inputs: dict, where: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(where), vocab]`` at the flat positions ``where`` (``row * T + t``) of a batch.

    Where the logits are exactly ``lm_head(decoder(...))`` (:func:`supports_chunked_loss`), the output
    layer runs on those positions' hidden states only (for a 49k-token vocabulary it is a large share of
    a small model's forward); otherwise the model's full logits are indexed.
    """
    cached = inputs.get("cache") is not None  # a key/value cache of a prefix (callbacks/retention.py)
    if supports_chunked_loss(model):
        _, decoder, head = _parts(model)
        hidden = decoder(**inputs, use_cache=cached).last_hidden_state
        return head(hidden.reshape(-1, hidden.shape[-1])[where])
    logits = model(**inputs, use_cache=cached).logits
    return logits.reshape(-1, logits.shape[-1])[where]


def trained_token_loss(
    model, inputs: dict, labels: torch.Tensor, divisor: torch.Tensor, chunk: int = CHUNK_ROWS, **kwargs
) -> torch.Tensor:
    """Summed next-token loss over positions with a label, divided by ``divisor``.

    ``inputs`` are the decoder's inputs (``input_ids`` and ``attention_mask`` or ``position_ids``),
    ``labels`` (B, T) with ``-100`` where nothing is trained; the result equals transformers'
    ``ForCausalLMLoss`` with ``num_items_in_batch=divisor`` (within float rounding).
    """
    logps, _ = _trained_logps(model, inputs, labels, chunk, **kwargs)
    return -logps.sum() / divisor


def _trained_logps(model, inputs: dict, labels: torch.Tensor, chunk: int, temperature: float = 1.0, **kwargs):
    """Log-prob of every trained position's label (in row-major order) and the (B, T-1) trained mask."""
    _, decoder, head = _parts(model)
    hidden = decoder(**inputs, **kwargs, use_cache=False).last_hidden_state
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    logps = _FrozenLinearLogProbs.apply(
        hidden[:, :-1][keep], head.weight, shifted[keep], chunk, 1 / temperature
    )
    return logps, keep


def token_logps(
    model,
    inputs: dict,
    labels: torch.Tensor,
    chunked: bool,
    temperature: float = 1.0,
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs, trained mask)``, both ``(B, T-1)``: at position ``t`` the log-prob of ``labels[:, t+1]``
    under ``softmax(logits / temperature)`` where that label is trained, 0 elsewhere.

    The per-token form of :func:`sequence_logps` (GRPO's losses weigh each token); ``chunked`` as there:
    only the trained positions get logits, a chunk at a time, never a (B, T, vocab) tensor."""
    shifted = labels[:, 1:]
    if chunked:
        logps, keep = _trained_logps(model, inputs, labels, chunk, temperature)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        keep = shifted != IGNORE_INDEX
        scores = logits[keep].float() / temperature
        logps = torch.log_softmax(scores, dim=-1).gather(1, shifted[keep][:, None])[:, 0]
    out = torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device)
    return out.masked_scatter(keep, logps), keep


def sequence_logps(
    model, inputs: dict, labels: torch.Tensor, chunked: bool, chunk: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed log-probs, trained-token counts)`` of each sequence of a batch, shape ``(B,)`` each: the
    log-likelihood of its labelled tokens (the answer of a preference side).

    ``chunked`` (see :func:`supports_chunked_loss`): only the trained positions get logits, a chunk at a
    time. Otherwise the model's full logits are taken (any model, FSDP's root unit included).
    """
    shifted = labels[:, 1:]
    if chunked:
        logps, keep = _trained_logps(model, inputs, labels, chunk)
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        keep = shifted != IGNORE_INDEX
        logps = torch.log_softmax(logits[keep].float(), dim=-1).gather(1, shifted[keep][:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    return sums, keep.sum(dim=1)
