"""Prompt + completion batches for GRPO and the log-probs of their completion tokens.

A row is the prompt's tokens followed by the completion's, right-padded to the batch's longest
(``input_ids``, ``attention_mask``), with ``labels`` on the completion tokens only: the trained
positions of the chunked-loss path (:func:`lit_lora.speedups.chunked_loss.token_logps`), so the
policy's, old policy's and reference's log-probs never build the ``(B, T, vocab)`` logits.
:func:`completion_logps` returns them aligned with the completion tokens: ``(B, Lc)``, ``Lc`` the
longest completion, 0 past each completion's end, with the matching 0/1 mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lit_lora.data.rendering import IGNORE_INDEX
from lit_lora.speedups.chunked_loss import token_logps


def completion_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device=None
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` (B, T) and ``prompt_lengths`` (B,) for rows
    ``prompt + completion``. Every completion must hold at least one token."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not completion:
            raise ValueError(f"completion {row} is empty")
        n, m = len(prompt), len(completion)
        ids[row, : n + m] = torch.tensor([*prompt, *completion])
        labels[row, n : n + m] = torch.tensor(completion)
        mask[row, : n + m] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_lengths": torch.tensor([len(p) for p in prompts]),
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def completion_logps(
    model, batch: dict[str, torch.Tensor], *, chunked: bool, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, mask)``, ``(B, Lc)``: each completion token's log-prob under ``softmax(logits / temperature)``
    of ``model`` as it is (adapter, train/eval flags, grad mode: the caller's), and 1 on real tokens.

    The right-padded batch needs no attention mask (a causal LM's real positions never attend to the
    padding after them), so attention takes its causal-only path."""
    inputs = {"input_ids": batch["input_ids"]}
    logps, keep = token_logps(model, inputs, batch["labels"], chunked, temperature)
    starts = batch["prompt_lengths"] - 1  # position p - 1 predicts the first completion token
    lengths = keep.sum(dim=1)
    width = int(lengths.max())
    index = (starts[:, None] + torch.arange(width, device=logps.device)[None, :]).clamp(
        max=logps.shape[1] - 1
    )
    mask = torch.arange(width, device=logps.device)[None, :] < lengths[:, None]
    out = logps.gather(1, index) * mask
    return out, mask.to(out.dtype)
