"""Adapter-only checkpoints that resume exactly: Lightning's ModelCheckpoint plus the RNG streams.

What is saved and how is the work of :class:`lit_lora.checkpoint_io.SafetensorsCheckpointIO` (folders
of safetensors + JSON, atomic) and :meth:`lit_lora.module.LitLoRA.on_save_checkpoint` (the adapter
instead of the frozen base). Top-k by a monitored metric, ``last``, and saving every N steps or at
validation are ModelCheckpoint's own options.

This subclass adds what exact resumption needs and Lightning does not save: the torch, numpy and
Python RNG states (dropout draws from them). They are restored just before the first training batch
after a resume, which is the point at which an uninterrupted run would continue with the same states.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import ModelCheckpoint


class AdapterCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose checkpoints also carry the RNG states, restored on resume.

    Defaults: folders named ``step-<NNNNNN>.ckpt`` (no metric in the name, so ``resume=auto`` can read the
    step from the folder itself), ``last.ckpt`` kept up to date.
    """

    def __init__(self, filename: str = "step-{step:06d}", save_last: bool = True, **kwargs: Any):
        super().__init__(filename=filename, save_last=save_last, auto_insert_metric_name=False, **kwargs)
        self._rng_to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": _collect_rng_states(include_cuda=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._rng_to_restore = state.pop("rng_states", None)
        super().load_state_dict(state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
