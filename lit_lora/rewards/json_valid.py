"""Built-in reward: does the completion start with a JSON object?"""

from __future__ import annotations

from lit_lora.rewards.calling import completion_text


def json_valid(prompts: list, completions: list, completion_ids: list, **kwargs) -> list[float | None]:
    """Per completion: 1.0 if its text (leading whitespace aside) starts with a JSON object, parsed by
    :func:`lit_lora.inference.scoring.parse_answer` (text after the object is ignored), else 0.0. A JSON
    array, string or number at the start is 0.0: the task's answers are objects. Never None."""
    # imported here: scoring pulls in Lightning, and this module is imported at config time
    from lit_lora.inference.scoring import parse_answer

    return [1.0 if isinstance(parse_answer(completion_text(c)), dict) else 0.0 for c in completions]
