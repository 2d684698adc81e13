"""Held-out reward scores: greedy answers to prompt rows, scored by the run's reward functions.

GRPO's counterpart of the SFT demo's held-out exact match: the validation curve (``val/reward``) and the
score of the base and the tuned model on the test split printed after training and kept in
``summary.json``. Greedy decoding (:func:`lit_lora.inference.decoding.generate_tokens`) makes the score a
property of the weights, not of a draw.
"""

from __future__ import annotations

import math

import torch

from lit_lora.data.rows import Row
from lit_lora.inference.decoding import adapter_enabled, eval_mode, generate_tokens
from lit_lora.progress import progress
from lit_lora.rewards.calling import score_rows
from lit_lora.rewards.loading import RewardFunction


def reward_scores(
    model,
    tokenizer,
    prompts: list[list[int]],
    rows: list[Row],
    rewards: list[RewardFunction],
    max_new_tokens: int,
    batch_size: int = 32,
    use_adapter: bool = True,
    desc: str | None = None,
) -> dict:
    """``{"total": mean weighted reward, "per_function": {name: mean or None}, "seen": {name: rows
    scored}, "binary": {name: every value 0 or 1}, "rows": n}`` of the greedy answers of ``model`` to ``prompts`` (token ids of ``rows``'
    rendered prompts). A function's None counts in neither its mean nor its ``seen``; a completion
    every function said None to counts 0 in the total."""
    texts: list[str] = []
    ids: list[list[int]] = []
    starts = range(0, len(prompts), batch_size)
    steps = progress(starts, len(starts), desc) if desc else starts
    with eval_mode(model), adapter_enabled(model, use_adapter):
        for start in steps:
            new = generate_tokens(
                model,
                prompts[start : start + batch_size],
                max_new_tokens=max_new_tokens,
                pad_id=tokenizer.pad_token_id,
                eos_id=tokenizer.eos_token_id,
            )
            ids += new
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    per_func = score_rows(rewards, rows, texts, ids)
    weights = torch.tensor([f.weight for f in rewards], dtype=torch.float32)
    total = (torch.nan_to_num(per_func, nan=0.0) * weights).sum(dim=1)
    per_function, seen, binary = {}, {}, {}
    for k, fn in enumerate(rewards):
        column = per_func[:, k]
        known = ~torch.isnan(column)
        seen[fn.name] = int(known.sum())
        per_function[fn.name] = float(column[known].mean()) if seen[fn.name] else None
        # A pass/fail reward (every value 0 or 1): its mean is a share, reported as a percentage.
        binary[fn.name] = bool(((column[known] == 0) | (column[known] == 1)).all())
    mean = float(total.mean()) if len(rows) else math.nan
    return {"total": mean, "per_function": per_function, "seen": seen, "binary": binary, "rows": len(rows)}
