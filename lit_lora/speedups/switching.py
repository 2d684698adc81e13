"""Routing a model's modules of one family through a fused forward, decided once per class."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn


def switch_forward(
    model: nn.Module, suffix: str, computes_same: Callable[[nn.Module], bool], forward: Callable
) -> int:
    """Bind ``forward`` as the ``forward`` of every module of ``model`` whose class name ends with
    ``suffix`` and whose class ``computes_same`` judges equal to it (one probe per class, on its first
    module); returns how many modules were switched."""
    verdict: dict[type, bool] = {}
    switched = 0
    for module in model.modules():
        cls = type(module)
        if not cls.__name__.endswith(suffix):
            continue
        if cls not in verdict:
            verdict[cls] = computes_same(module)
        if verdict[cls]:
            module.forward = types.MethodType(forward, module)
            switched += 1
    return switched
