"""Built-in reward: does the completion have the expected form (a regular expression)?"""

from __future__ import annotations

import re

from lit_lora.rewards.calling import completion_text


def regex_format(
    prompts: list, completions: list, completion_ids: list, pattern: str, **kwargs
) -> list[float | None]:
    """Per completion: 1.0 if ``pattern`` matches its whole text, stripped of surrounding whitespace
    (``re.fullmatch`` with ``re.DOTALL``, so ``.`` spans lines), else 0.0. Never None.

    ``pattern`` is set in the config (``rewards.fmt.pattern: '\\{.*\\}'``); an invalid one raises
    ``re.error`` on the first batch, which the caller reports as the config's mistake.
    """
    compiled = re.compile(pattern, re.DOTALL)  # once per batch, not per completion
    return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]
