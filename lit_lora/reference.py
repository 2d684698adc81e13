"""The reference model of DPO, without a second copy of the base.

By default the reference is the base itself: the trained adapter switched off with PEFT's
``disable_adapter()``. With ``objective.ref_adapter=<folder>`` it is the base plus that adapter, loaded
by :func:`load_reference` as a second, frozen adapter (named :data:`REFERENCE_ADAPTER`) on the same
base: the usual SFT -> DPO chain (``lora.init_from=<sft> objective.ref_adapter=<sft>``) then costs
the memory of one more adapter, not of one more model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch

from lit_lora.adapters import check_adapter_folder
from lit_lora.errors import UserError

REFERENCE_ADAPTER = "reference"


def load_reference(model, folder: str) -> None:
    """Load the adapter in ``folder`` onto ``model`` (a ``PeftModel``) as the frozen reference adapter.

    Raises :class:`UserError`, naming both, when its base model or its shapes differ from the run's.
    """
    path = check_adapter_folder(folder)
    own = model.peft_config[model.active_adapter]
    theirs = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if theirs and own.base_model_name_or_path and theirs != own.base_model_name_or_path:
        raise UserError(
            f"objective.ref_adapter={folder} was trained on {theirs}, but this run's model is "
            f"{own.base_model_name_or_path}; the reference must adapt the same base"
        )
    try:
        model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatch, unknown target modules...
        # PEFT registers the adapter before it copies the weights: leave no half-loaded reference behind.
        if REFERENCE_ADAPTER in model.peft_config:
            with contextlib.suppress(Exception):
                model.delete_adapter(REFERENCE_ADAPTER)
            model.peft_config.pop(REFERENCE_ADAPTER, None)
        raise UserError(
            f"objective.ref_adapter={folder} does not fit this run's model "
            f"{own.base_model_name_or_path}: {str(err).splitlines()[0]}"
        ) from err


@contextlib.contextmanager
def reference_model(model) -> Iterator[None]:
    """Inside, ``model`` (a ``PeftModel``) computes as the reference: the base alone, or base + the
    reference adapter when one is loaded. Call it under ``torch.no_grad()``.

    The model is put in eval mode inside (the reference is a fixed function: no dropout, whatever the
    reference adapter's ``lora_dropout``) and restored after. Switching to the reference adapter uses
    PEFT's ``set_adapter(..., inference_mode=True)``, which also freezes the trained adapter; switching
    back makes the trained adapter trainable again, so its parameters are the same objects with the
    same ``requires_grad`` afterwards.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("reference_model() must run under torch.no_grad()")
    training = model.training
    model.eval()
    try:
        if REFERENCE_ADAPTER in model.peft_config:
            trained = model.active_adapter
            model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield
            finally:
                model.set_adapter(trained)
        else:
            with model.disable_adapter():
                yield
    finally:
        model.train(training)
