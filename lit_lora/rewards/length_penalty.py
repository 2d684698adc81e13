"""Built-in reward: a penalty for long completions."""

from __future__ import annotations


def length_penalty(
    prompts: list, completions: list, completion_ids: list[list[int]], max_tokens: int = 64, **kwargs
) -> list[float | None]:
    """Per completion: ``-min(len(ids), max_tokens) / max_tokens`` where ``ids`` are its generated token
    ids: 0.0 for an empty completion, falling linearly to -1.0 at ``max_tokens`` tokens and staying -1.0
    beyond. Never None. ``max_tokens`` (set in the config) must be a positive integer."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    return [-min(len(ids), max_tokens) / max_tokens for ids in completion_ids]
