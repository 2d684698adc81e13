"""PEFT adapter folders: checking one, attaching it to a base, and what was saved with it.

Any PEFT LoRA adapter folder loads (lit-lora's or another tool's); lit-lora's also hold the tokenizer
and ``rendering.json`` of their training, which :func:`tokenizer_for` and :func:`rendering_for` read.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from lit_lora.data.rendering import RENDERING_FILE, Rendering
from lit_lora.errors import UserError


def check_adapter_folder(folder: str | Path) -> Path:
    """A PEFT adapter folder (``adapter_config.json`` + weights), or a :class:`UserError` saying what is missing."""
    path = Path(folder).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"{folder} holds no adapter weights (adapter_model.safetensors)")
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{folder}: only adapter_model.bin (pickle) found; lit-lora reads safetensors only")
    return path


def attach_adapter(base, folder: str | Path, trainable: bool = False):
    """``PeftModel`` of ``base`` with the adapter in ``folder``; a :class:`UserError` when it does not fit."""
    from peft import PeftModel

    path = check_adapter_folder(folder)
    try:
        return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatch, unknown target modules...
        raise UserError(
            f"the adapter in {folder} does not fit this base model: {str(err).splitlines()[0]}"
        ) from err


def load_named_adapter(model, path: Path, name: str, trainable: bool = False) -> None:
    """Load the adapter in ``path`` onto ``model`` (a ``PeftModel``) as ``name``. On failure (shape
    mismatch, unknown target modules...) the error is raised as PEFT raised it, and no half-loaded
    adapter is left behind: PEFT registers the adapter before it copies the weights."""
    try:
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError):
        if name in model.peft_config:
            with contextlib.suppress(Exception):
                model.delete_adapter(name)
            model.peft_config.pop(name, None)
        raise


def tokenizer_for(adapter: Path, fallback):
    """The tokenizer saved with the adapter (lit-lora saves one), else ``fallback`` (the base model's)."""
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(adapter))
    return fallback


def rendering_for(folder: Path, tokenizer) -> Rendering:
    """The rendering saved with an adapter or merged model; else the tokenizer's own chat template."""
    if (folder / RENDERING_FILE).is_file():
        return Rendering.load(folder)
    return Rendering.resolve(tokenizer)


# The name of DPO's reference adapter (objective.ref_adapter) beside the trained one on the same base.
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
        load_named_adapter(model, path, REFERENCE_ADAPTER)
    except (RuntimeError, ValueError, KeyError) as err:  # shape mismatch, unknown target modules...
        raise UserError(
            f"objective.ref_adapter={folder} does not fit this run's model "
            f"{own.base_model_name_or_path}: {str(err).splitlines()[0]}"
        ) from err
