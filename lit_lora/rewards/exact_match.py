"""Built-in reward: is the completion's answer the row's ``answer``?"""

from __future__ import annotations

import json

from lit_lora.rewards.calling import completion_text


def exact_match(
    prompts: list, completions: list, completion_ids: list, answer: list, **kwargs
) -> list[float | None]:
    """Per completion: 1.0 if its text equals the row's ``answer`` column, else 0.0; None where that
    row's answer is None (nothing to compare with).

    The comparison is :func:`lit_lora.inference.scoring.exact_match`'s, the held-out metric's: a JSON
    answer (an object or array) compares as a parsed object with the JSON at the start of the completion
    (spacing, key order and trailing text do not matter); any other answer as stripped text. An answer
    that is not a string (a JSON column already parsed to an object, a number) is compared as its JSON
    text.
    """
    # imported here: scoring pulls in Lightning, and this module is imported at config time
    from lit_lora.inference.scoring import exact_match as matches

    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            rewards.append(None)
            continue
        reference = expected if isinstance(expected, str) else json.dumps(expected)
        [hit] = matches([completion_text(completion)], [reference])
        rewards.append(1.0 if hit else 0.0)
    return rewards
