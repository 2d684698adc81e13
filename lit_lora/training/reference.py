"""The reference model of DPO, without a second copy of the base.

By default the reference is the base itself: the trained adapter switched off with PEFT's
``disable_adapter()``. With ``objective.ref_adapter=<folder>`` it is the base plus that adapter, loaded
by :func:`load_reference` as a second, frozen adapter (named :data:`REFERENCE_ADAPTER`) on the same
base: the usual SFT -> DPO chain (``lora.init_from=<sft> objective.ref_adapter=<sft>``) then costs
the memory of one more adapter, not of one more model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lit_lora.data.batching import REF_LOGPS, collate_pairs
from lit_lora.models.adapters import REFERENCE_ADAPTER
from lit_lora.progress import progress
from lit_lora.staging import write_file_atomic


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


# ----------------------------------------------------------------------- objective.precompute_ref
REFERENCE_FOLDER = "reference"  # in the run folder: <key>.safetensors, one per data + model identity


def reference_key(examples: dict[str, list[dict]], identity: dict) -> str:
    """A hash of every pair's tokens (train and val, in order) and of what the reference computes with
    (``identity``: the model, its quantization, precision, the reference adapter's digest...): the
    same key means the same reference log-probs."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for split in sorted(examples):
        digest.update(f"|{split}:{len(examples[split])}|".encode())
        for e in examples[split]:
            for key in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
                digest.update(np.asarray(e[key], dtype=np.int64).tobytes())
                digest.update(b",")
    return digest.hexdigest()[:24]


class PrecomputedReference(L.Callback):
    """``objective.precompute_ref=true``: before the first step, the reference's summed log-probs of the
    chosen and rejected answer of every train and val pair, attached to each example (``ref_logps``,
    which :func:`lit_lora.data.batching.collate_pairs` puts in the batch and the DPO loss reads instead of a
    reference forward). Kept in ``<run>/reference/<key>.safetensors`` (:func:`reference_key`), so a
    resumed run reads them back instead of computing them again.

    The pass runs in the precision plugin's forward context (the autocast the steps run under), in
    batches of ``batch_size`` pairs. Every rank computes all pairs (each rank's steps may draw any of
    them; the pass costs one forward without gradients per pair, about a third of a training step's
    work) and rank zero writes the file. ``status`` says ``computed`` or ``loaded`` afterwards.
    """

    def __init__(self, folder: Path, identity: dict, batch_size: int):
        self.folder = Path(folder)
        self.identity = identity
        self.batch_size = batch_size
        self.status: str | None = None
        self.seconds: float | None = None
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        started = time.perf_counter()
        datamodule = trainer.datamodule
        examples = {split: datamodule.examples[split] for split in ("train", "val")}
        self.path = self.folder / f"{reference_key(examples, self.identity)}.safetensors"
        stored = self._read(examples)
        if stored is None:
            stored = {
                split: self._compute(pl_module, trainer, items, datamodule.tokenizer.pad_token_id, split)
                for split, items in examples.items()
            }
            if trainer.is_global_zero:
                self._write(stored)
            self.status = "computed"
        else:
            self.status = "loaded"
        for split, items in examples.items():
            for example, pair in zip(items, stored[split].tolist(), strict=True):
                example[REF_LOGPS] = pair
        self.seconds = round(time.perf_counter() - started, 2)
        if trainer.is_global_zero:
            verb = "computed" if self.status == "computed" else f"read from {self.path}"
            print(
                f"lit-lora: reference log-probs of {sum(map(len, examples.values()))} pairs {verb} "
                f"({self.seconds:.1f} s); no step runs the reference",
                flush=True,
            )

    def summary_metrics(self) -> dict:
        return {
            "precomputed_reference": {"status": self.status, "seconds": self.seconds, "file": str(self.path)}
        }

    def _read(self, examples: dict[str, list[dict]]) -> dict[str, torch.Tensor] | None:
        if not self.path.is_file():
            return None
        stored = load_file(str(self.path))
        if any(stored.get(s, torch.empty(0)).shape != (len(items), 2) for s, items in examples.items()):
            return None  # written by another version; the key matched, the content does not: recompute
        return stored

    def _write(self, stored: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in stored.items()}
        metadata = {"identity": json.dumps(self.identity, default=str)}
        write_file_atomic(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def _compute(
        self, pl_module, trainer: L.Trainer, items: list[dict], pad_id: int, split: str
    ) -> torch.Tensor:
        out = torch.zeros(len(items), 2, dtype=torch.float32)
        starts = range(0, len(items), self.batch_size)
        with torch.no_grad(), reference_model(pl_module.model), trainer.precision_plugin.forward_context():
            for start in progress(starts, len(starts), f"reference log-probs ({split})"):
                batch = collate_pairs(items[start : start + self.batch_size], pad_id)
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                logps = pl_module._sequence_logps(batch)[0].cpu()
                out[start : start + self.batch_size] = torch.stack(logps.chunk(2), dim=1)
        return out
