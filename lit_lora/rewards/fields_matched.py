"""Built-in reward: partial credit for the fields of a JSON answer."""

from __future__ import annotations

from lit_lora.rewards.calling import completion_text


def fields_matched(
    prompts: list, completions: list, completion_ids: list, answer: list, **kwargs
) -> list[float | None]:
    """Per completion, with ``expected`` the row's ``answer`` as a JSON object (a JSON string, parsed by
    :func:`lit_lora.inference.scoring.parse_answer`, or already a dict) and ``got`` the JSON object at the
    start of the completion::

        matched / max(len(expected), len(got))

    where ``matched`` counts the keys of ``expected`` whose value ``got`` has equal (as parsed JSON,
    nested values compared whole). That is the share of expected fields got right, times
    ``len(expected) / max(len(expected), len(got))``, so extra keys cost: 1.0 only for an equal object.
    0.0 if the completion does not start with a JSON object; 1.0 if both objects are empty. None where
    the answer is None or not a JSON object (the reward has no opinion on rows it does not apply to).
    """
    # imported here: scoring pulls in Lightning, and this module is imported at config time
    from lit_lora.inference.scoring import parse_answer

    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = parse_answer(reference) if isinstance(reference, str) else reference
        if not isinstance(expected, dict):
            rewards.append(None)
            continue
        got = parse_answer(completion_text(completion))
        if not isinstance(got, dict):
            rewards.append(0.0)
            continue
        size = max(len(expected), len(got))
        matched = sum(1 for key, value in expected.items() if key in got and got[key] == value)
        rewards.append(matched / size if size else 1.0)
    return rewards
