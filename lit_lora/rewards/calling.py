"""Calling the reward functions on a batch of completions: :func:`score_completions`, :func:`score_rows`.

The calling convention is TRL's (``GRPOTrainer``): each function is called once per batch with
``prompts=``, ``completions=``, ``completion_ids=`` and every other dataset column by keyword, each a list
with one value per completion (a prompt's value repeated for each of its completions). It returns one
reward per completion, ``None`` for "no opinion" (NaN in the result). What a function returns is
checked: a reward function is user code, and a wrong value would otherwise surface as a NaN loss many
steps later or not at all. Every mistake is a one-line :class:`~lit_lora.errors.UserError` naming the
function (``rewards.<name>``) and the row it concerns (its ``loc``, e.g. ``train.jsonl:12``).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

from lit_lora.errors import UserError
from lit_lora.rewards.loading import RewardFunction, one_line

if TYPE_CHECKING:
    import torch

# The largest float32 (torch.finfo(torch.float32).max): a larger finite float would become inf in the
# (N, K) float32 tensor.
_FLOAT32_MAX = 3.4028234663852886e38
# How many rows an error message names before it says how many there are in all.
_ROWS_SHOWN = 3


def score_completions(
    functions: list[RewardFunction],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    locs: list[str],
) -> torch.Tensor:
    """The rewards of ``N = len(completions)`` completions, an ``(N, K)`` float32 tensor with one column
    per function (``K = len(functions)``, in their order) and NaN where a function returned None.

    ``prompts``, ``completion_ids``, ``locs`` and every list of ``columns`` have one entry per completion;
    ``locs[i]`` says where completion ``i``'s row came from. The weights are not applied here (the
    caller combines the columns). Raises :class:`UserError` if a function raises, needs a column the
    rows lack, or returns anything but ``N`` finite numbers (bools count) or None; a ``ValueError`` if
    the inputs' lengths differ (a bug of the caller, not the user's).
    """
    import torch  # here, not at the top: the built-ins import this module at config time

    n = len(completions)
    _check_lengths(n, {"prompts": prompts, "completion_ids": completion_ids, "locs": locs, **columns})
    # built as Python lists and converted once: N * K single-element tensor writes are slow
    scores = [[math.nan] * len(functions) for _ in range(n)]
    for k, function in enumerate(functions):
        _check_columns(function, columns, locs)
        try:
            returned = function.fn(
                prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
            )
        except Exception as err:  # user code: any exception is the user's to fix, said in one line
            raise UserError(
                f"rewards.{function.name} raised {one_line(err)} on the batch of rows {_rows(locs)}"
            ) from err
        for i, value in enumerate(_as_list(function, returned, n)):
            scores[i][k] = _as_float(function, value, i, locs[i])
    return torch.tensor(scores, dtype=torch.float32).reshape(n, len(functions))


# Names TRL passes itself; a dataset column of that name is not passed again.
_RESERVED = {"prompt", "prompts", "completions", "completion_ids"}


def score_rows(
    functions: list[RewardFunction], rows: list, texts: list[str], completion_ids: list[list[int]]
):
    """:func:`score_completions` for completions of prompt rows (:class:`lit_lora.data.rows.Row`, one per
    completion, a prompt's row repeated for each of its completions): the prompts as the rows gave them,
    each completion as a string or, for a prompt given as messages, as TRL's conversational
    ``[{"role": "assistant", "content": text}]``, and every column of the rows (None where a row lacks it)."""
    completions = [
        [{"role": "assistant", "content": t}] if isinstance(r.prompt, list) else t
        for r, t in zip(rows, texts, strict=True)
    ]
    keys = sorted({k for r in rows for k in (r.columns or {})} - _RESERVED)
    columns = {k: [(r.columns or {}).get(k) for r in rows] for k in keys}
    prompts = [r.prompt for r in rows]
    return score_completions(functions, prompts, completions, completion_ids, columns, [r.loc for r in rows])


def completion_text(completion: object) -> str:
    """The text of a completion: a string as it is, or, for TRL's conversational form (a list of chat
    messages, ``[{"role": "assistant", "content": "..."}]``), the last message's content. Content given
    as parts (``[{"type": "text", "text": "..."}]``) is the concatenation of its text parts."""
    if isinstance(completion, str):
        return completion
    message = completion
    if isinstance(completion, list | tuple):
        if not completion:
            return ""
        message = completion[-1]
    if not isinstance(message, dict) or "content" not in message:
        raise TypeError(
            f"a completion is a string or a list of chat messages with a 'content', got {completion!r:.80}"
        )
    content = message["content"]
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _check_lengths(n: int, lists: dict[str, list]) -> None:
    for name, values in lists.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} completions")


def _check_columns(function: RewardFunction, columns: dict[str, list], locs: list[str]) -> None:
    """A column the function requires must be there, and none may share a bound argument's name (the
    column would silently replace the config's value)."""
    for name in function.columns:
        if name not in columns:
            have = ", ".join(sorted(columns)) or "none"
            raise UserError(
                f"rewards.{function.name} needs {name!r}: set rewards.{function.name}.{name} in the config "
                f"or give the rows a column {name!r} (the rows {_rows(locs)} have the columns: {have})"
            )
    for name in function.bound:
        if name in columns:
            raise UserError(
                f"rewards.{function.name}.{name} is set in the config and is also a column of the rows "
                f"{_rows(locs)}: rename one of them"
            )


def _as_list(function: RewardFunction, returned: object, n: int) -> list:
    """``returned`` as a list of ``n`` values: a list, a tuple, or a 1-D numpy array or torch tensor."""
    if hasattr(returned, "shape") and hasattr(returned, "tolist"):  # numpy, torch (not imported for this)
        shape = tuple(getattr(returned, "shape", ()))
        if len(shape) != 1:
            raise UserError(
                f"rewards.{function.name} returned an array of shape {shape}; it must return one reward per "
                f"completion ({n})"
            )
        returned = returned.tolist()
    if not isinstance(returned, list | tuple):
        raise UserError(
            f"rewards.{function.name} returned a {type(returned).__name__}, not a list of {n} rewards (one per "
            "completion, None for no opinion)"
        )
    if len(returned) != n:
        raise UserError(f"rewards.{function.name} returned {len(returned)} rewards for {n} completions")
    return list(returned)


def _as_float(function: RewardFunction, value: object, i: int, loc: str) -> float:
    """One reward as a float: None is NaN ("no opinion"); a number (bool, int, float, numpy or 0-d torch
    scalar) must be finite in float32."""
    if value is None:
        return float("nan")
    # 0-d tensors and numpy scalars (np.bool_ is no numbers.Real) as Python numbers
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise UserError(
            f"rewards.{function.name} returned {value!r:.60} ({type(value).__name__}) for completion {i} "
            f"(row {loc}); a reward is a number, or None for no opinion"
        )
    reward = float(value)
    if not math.isfinite(reward) or abs(reward) > _FLOAT32_MAX:
        raise UserError(
            f"rewards.{function.name} returned {reward} for completion {i} (row {loc}); a reward must be "
            "finite (return None for no opinion)"
        )
    return reward


def _rows(locs: list[str]) -> str:
    """The distinct rows of a batch, the first few by name (a prompt's completions share its row)."""
    distinct = list(dict.fromkeys(locs))
    shown = ", ".join(distinct[:_ROWS_SHOWN])
    more = len(distinct) - _ROWS_SHOWN
    return f"{shown} ... ({len(distinct)} rows)" if more > 0 else shown
