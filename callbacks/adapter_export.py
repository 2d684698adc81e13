"""Write the final adapter in PEFT format when training ends."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

from lit_lora.staging import staged_folder


class AdapterExport(L.Callback):
    """At the end of ``fit``, save the adapter into ``dirpath`` (rank zero only).

    Files written: ``adapter_model.safetensors``, ``adapter_config.json`` (PEFT's own format, loadable
    with ``PeftModel.from_pretrained(base, dirpath)``), the tokenizer files and ``rendering.json``.
    The folder is written under a temporary name and renamed into place, so a crash never leaves a
    half-written adapter. An existing ``dirpath`` is never overwritten: that is an error.
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.saved_to: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath.exists():
            raise FileExistsError(f"{self.dirpath} already exists; lit-lora never overwrites an adapter")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under FSDP the adapter is gathered on every rank (a collective); rank zero writes it.
        gather = getattr(pl_module, "full_params", contextlib.nullcontext)
        with gather():
            if trainer.is_global_zero:
                self._write(pl_module)

    def _write(self, pl_module: L.LightningModule) -> None:
        with staged_folder(self.dirpath, mode=0o755) as tmp:
            write_adapter(pl_module, tmp)
            if getattr(pl_module, "tokenizer", None) is not None:
                pl_module.tokenizer.save_pretrained(tmp)
            if getattr(pl_module, "rendering", None) is not None:
                pl_module.rendering.save(tmp)
        self.saved_to = self.dirpath

    def summary_metrics(self) -> dict:
        if self.saved_to is None:
            return {}
        weights = self.saved_to / "adapter_model.safetensors"
        return {"adapter_dir": str(self.saved_to), "adapter_bytes": weights.stat().st_size}


def write_adapter(pl_module: L.LightningModule, folder: Path) -> None:
    """The adapter as PEFT's ``save_pretrained`` writes it: ``adapter_config.json`` (inference mode) and
    ``adapter_model.safetensors`` under PEFT's names.

    The weights come from ``LitLoRA.adapter_weights`` (the adapter's own parameters), not from PEFT's
    ``save_pretrained``, which reads the whole model's ``state_dict`` (under FSDP: gathering the frozen
    base) and selects entries by module names that FSDP's wrappers change (it saved nothing there)."""
    model = pl_module.model
    if not hasattr(pl_module, "adapter_weights"):  # any LightningModule holding a PeftModel
        model.save_pretrained(folder, safe_serialization=True)
        return
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(
        pl_module.adapter_weights(), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
