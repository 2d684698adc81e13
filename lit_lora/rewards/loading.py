"""The config's ``rewards`` as callables: :func:`load_rewards`.

Each entry names a callable by its import path (``_target_``), optionally a ``weight`` and a ``name``;
every other key is a keyword argument bound to the callable. Two forms::

    rewards:                       # a mapping: the key is the name
      fmt: {_target_: lit_lora.rewards.format_regex.regex_format, pattern: '\\{.*\\}', weight: 0.5}
      correct: {_target_: lit_lora.rewards.exact_match.exact_match}

    rewards:                       # a list: the name is the target's last component unless given
      - {_target_: lit_lora.rewards.exact_match.exact_match}

A mapping entry set to ``null`` is left out (so ``rewards.fmt=null`` on the command line drops one).

This runs at config time, before any model loads: it imports the targets and inspects their signatures
and nothing else (no torch here). Every mistake is a one-line :class:`~lit_lora.errors.UserError` that
names the config key.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lit_lora.errors import UserError

# The keyword arguments every call passes (TRL's calling convention); the dataset's columns come besides.
CALL_ARGS = ("prompts", "completions", "completion_ids")
# Keys of an entry that configure the entry itself rather than bind an argument.
ENTRY_KEYS = ("_target_", "weight", "name")
SIGNATURE = "f(prompts, completions, completion_ids, **columns) -> list[float | None]"


@dataclass
class RewardFunction:
    """A loaded reward function: ``fn`` is the target with the entry's keyword arguments bound (a
    :func:`functools.partial` when there are any), called as TRL calls one (:data:`SIGNATURE`).

    ``columns`` are the parameters the target requires that are neither call arguments nor bound: they
    must come from the dataset's columns (e.g. ``answer``), which :func:`~.calling.score_completions`
    checks before calling. ``bound`` are the names of the bound keyword arguments (a column of the same
    name would be ambiguous)."""

    name: str
    fn: Callable
    weight: float
    columns: tuple[str, ...] = ()
    bound: tuple[str, ...] = ()


def load_rewards(spec: object, key: str = "rewards") -> list[RewardFunction]:
    """The reward functions of ``spec`` (the config's value at ``key``), in the config's order.

    ``spec`` is None or empty (no rewards), a list of mappings, or a mapping name -> mapping (plain
    Python or OmegaConf, resolved here). Names are unique: a repeated one gets ``_2``, ``_3``, ...
    Raises :class:`UserError` naming the key (``rewards.fmt._target_`` or ``rewards[1].weight``) for a
    missing or unimportable target, one that is not callable or does not take TRL's arguments, a bound
    argument the target does not accept, or a weight that is not a finite number.
    """
    spec = _plain(key, spec)
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        entries = [(f"{key}.{k}", str(k), v) for k, v in spec.items() if v is not None]
    elif isinstance(spec, list | tuple):
        entries = [(f"{key}[{i}]", None, v) for i, v in enumerate(spec)]
    else:
        raise UserError(f"{key} must be a list or a mapping of reward functions, got {spec!r}")

    functions: list[RewardFunction] = []
    taken: set[str] = set()
    for where, default_name, entry in entries:
        function = _load_entry(where, default_name, entry)
        function.name = _unique(function.name, taken)
        taken.add(function.name)
        functions.append(function)
    return functions


def _plain(key: str, spec: object) -> object:
    """``spec`` as plain Python containers (OmegaConf nodes resolved); other values as they are."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(spec, DictConfig | ListConfig):
        return spec
    try:
        return OmegaConf.to_container(spec, resolve=True)
    except Exception as err:  # an interpolation that does not resolve: OmegaConf's message says which
        raise UserError(f"{key}: {one_line(err)}") from err


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}_{n}" in taken:
        n += 1
    return f"{name}_{n}"


def _load_entry(where: str, default_name: str | None, entry: object) -> RewardFunction:
    if not isinstance(entry, Mapping):
        raise UserError(f"{where} must be a mapping with a _target_, got {entry!r}")
    if "_target_" not in entry:
        raise UserError(f"{where}._target_ is missing: set it to the import path of a reward function")
    target = entry["_target_"]
    fn = _import(f"{where}._target_", target)
    weight = _weight(f"{where}.weight", entry.get("weight", 1.0))
    name = entry.get("name", default_name or target.rpartition(".")[2])
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}.name must be a non-empty string, got {name!r}")
    kwargs = {str(k): v for k, v in entry.items() if k not in ENTRY_KEYS}
    columns = _check_signature(where, target, fn, kwargs)
    bound = functools.partial(fn, **kwargs) if kwargs else fn
    return RewardFunction(name, bound, weight, columns, tuple(kwargs))


def _import(where: str, target: object) -> Callable:
    """The callable at the dotted path ``target`` (``package.module.function``)."""
    if not isinstance(target, str) or "." not in target.strip("."):
        raise UserError(f"{where}={target!r} must be a dotted import path such as package.module.function")
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # the user's module may fail to import in any way; say how, in one line
        raise UserError(f"{where}={target!r} cannot be imported: {one_line(err)}") from err
    if not callable(obj):
        raise UserError(f"{where}={target!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _weight(where: str, weight: object) -> float:
    # bool is an int to Python, but `weight: true` is a slip, not a weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise UserError(f"{where}={weight!r} must be a finite number")
    return float(weight)


def _check_signature(where: str, target: str, fn: Callable, kwargs: dict) -> tuple[str, ...]:
    """Check that ``fn`` can be called as TRL calls a reward function with ``kwargs`` bound; return the
    parameters it requires from the dataset's columns.

    The call passes ``prompts``, ``completions``, ``completion_ids`` and every column by keyword, so the
    function needs a ``**kwargs`` (the columns it does not name) and no required positional-only
    parameter. A required parameter that is none of those is a column it reads (``answer``): which
    columns the rows have is only known when they are scored.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature; the call will tell
        return ()
    expected = f"a reward function has TRL's signature {SIGNATURE}"
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for name in kwargs:
        if name in CALL_ARGS:
            raise UserError(f"{where}.{name} cannot be set in the config: every call passes {name}")
        # the most specific complaint first: a misspelt argument of a function that has no **kwargs
        if name not in named and not takes_any:
            raise UserError(f"{where}.{name}: {target} has no parameter {name!r}")
    if not takes_any:
        raise UserError(
            f"{where}._target_={target!r} takes no **kwargs, so it cannot receive the dataset's columns: {expected}"
        )
    for p in params:
        if p.kind is p.POSITIONAL_ONLY and p.default is p.empty:
            raise UserError(
                f"{where}._target_={target!r} has the positional-only parameter {p.name!r}, but every "
                f"argument is passed by keyword: {expected}"
            )
    return tuple(
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and p.name not in CALL_ARGS
        and p.name not in kwargs
    )


def one_line(err: BaseException) -> str:
    """An exception as ``Type: first line of the message`` (a UserError's message must be one line)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
