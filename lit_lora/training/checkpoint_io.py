"""Lightning checkpoints as folders of safetensors and JSON: no pickle, adapter in PEFT format, atomic.

A checkpoint ``<name>.ckpt/`` holds:

- ``adapter/adapter_model.safetensors`` and ``adapter/adapter_config.json``: the adapter, loadable by
  plain PEFT (``PeftModel.from_pretrained(base, "<ckpt>/adapter")``);
- ``state.safetensors``: every other tensor of Lightning's checkpoint dict (optimizer moments, RNG states);
- ``state.json``: the rest of the dict (loop counters, scheduler, callback states, data position), with
  references to the tensors.

The frozen base is never written (:class:`lit_lora.training.module.LitLoRA` replaces Lightning's ``state_dict``
with the adapter). Saving writes into a hidden ``.tmp-*`` folder, fsyncs every file and the folder,
then renames it: a checkpoint folder under its final name is always complete, and a save killed half
way leaves only a ``.tmp-*`` folder that :func:`find_resumable` ignores and the next save cleans up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lit_lora.errors import UserError
from lit_lora.staging import staged_folder
from lit_lora.training import faults

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TMP_PREFIX = ".tmp-"


def _flatten(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """A JSON-able copy of ``value``; tensors and arrays move to ``tensors`` and leave a reference."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensor = value.detach().cpu().contiguous()
        if any(
            t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in tensors.values()
        ):
            tensor = (
                tensor.clone()
            )  # safetensors refuses tensors that share memory (e.g. one score kept twice)
        tensors[key] = tensor
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _flatten(v, tensors, f"{where}.{k}") for k, v in value.items()}
        # int keys (optimizer state) must come back as ints: keep them as pairs
        return {
            "__pairs__": [
                [_flatten(k, tensors, where), _flatten(v, tensors, f"{where}.{k}")] for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, where) for v in value]}
    if isinstance(value, list):
        return [_flatten(v, tensors, where) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"checkpoint entry {where} has type {type(value).__name__}, which cannot be saved without pickle"
    )


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
    if "__pairs__" in value:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__pairs__"]}
    return {k: _unflatten(v, tensors) for k, v in value.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """Write ``checkpoint`` (Lightning's dict, with an ``adapter`` entry) as the folder ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{TMP_PREFIX}*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    # The .tmp- prefix marks leftovers for the cleanup above and clean_stale; an existing checkpoint
    # (e.g. last.ckpt) is moved aside, replaced, then dropped.
    with staged_folder(path, replace=True, prefix=f"{TMP_PREFIX}{path.name}-") as tmp:
        (tmp / ADAPTER_DIR).mkdir()
        rest = dict(checkpoint)
        adapter = rest.pop("adapter", None)
        if adapter is not None:
            save_file(adapter["weights"], str(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            _fsync(tmp / ADAPTER_DIR / ADAPTER_WEIGHTS)
            _write_json(tmp / ADAPTER_DIR / ADAPTER_CONFIG, adapter["config"])
        faults.during_save()
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(rest, tensors, "checkpoint")
        save_file(tensors, str(tmp / STATE_TENSORS))
        _fsync(tmp / STATE_TENSORS)
        _write_json(tmp / STATE_JSON, skeleton)
        _fsync(tmp / ADAPTER_DIR)
        _fsync(tmp)
    _fsync(path.parent)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict written by :func:`write_checkpoint` (``adapter`` = weights and config)."""
    path = Path(path)
    if not (path / STATE_JSON).is_file():
        raise UserError(f"{path} is not a lit-lora checkpoint folder (no {STATE_JSON})")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
        checkpoint = _unflatten(json.loads((path / STATE_JSON).read_text()), tensors)
        adapter_dir = path / ADAPTER_DIR
        if (adapter_dir / ADAPTER_WEIGHTS).is_file():
            checkpoint["adapter"] = {
                "weights": load_file(str(adapter_dir / ADAPTER_WEIGHTS)),
                "config": json.loads((adapter_dir / ADAPTER_CONFIG).read_text()),
            }
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        # A pickle (or anything else) in place of safetensors / JSON is refused, never unpickled.
        raise UserError(
            f"{path} is not a valid lit-lora checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "lit-lora reads checkpoints only as safetensors and JSON"
        ) from err
    return checkpoint


def checkpoint_step(path: Path) -> int | None:
    """The global step a complete checkpoint folder was saved at, or None if it is not one."""
    try:
        return int(json.loads((Path(path) / STATE_JSON).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clean_stale(folder: Path) -> int:
    """Remove the ``.tmp-*`` leftovers of saves that were killed or failed; returns how many."""
    stale = list(Path(folder).glob(f"{TMP_PREFIX}*")) if Path(folder).is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def find_resumable(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (highest global step; ``last`` wins a tie)."""
    candidates = []
    for path in Path(folder).glob("*.ckpt"):
        step = checkpoint_step(path) if path.is_dir() else None
        if step is not None:
            candidates.append((step, path.name.startswith("last"), path))
    return max(candidates)[2] if candidates else None


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` plugin that reads and writes the checkpoint folders described above."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_checkpoint(checkpoint, Path(path))

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        return read_checkpoint(Path(path))

    def remove_checkpoint(self, path) -> None:
        shutil.rmtree(path, ignore_errors=True)
