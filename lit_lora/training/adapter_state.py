"""The adapter's state as checkpoints hold it: the trainable parameters of one PEFT model, under PEFT's
saved names, whole even under FSDP, checked against the model before they are loaded.

A checkpoint (``lit_lora.training.checkpoint_io``) holds ``checkpoint["adapter"] = {"weights": {PEFT name:
tensor}, "config": PEFT's adapter config}``, ``checkpoint["trainable_params"]`` and an empty
``state_dict``: the frozen base is never stored.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
from lightning.pytorch.strategies import FSDPStrategy
from peft import get_peft_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lit_lora.errors import UserError
from lit_lora.models.builder import count_params

# Prefixes FSDP and its activation checkpointing insert into parameter names.
_FSDP_PREFIX = "_fsdp_wrapped_module."
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def _all_trainable(params: Iterator[torch.nn.Parameter]) -> bool:
    """True if there is at least one parameter and every one requires grad (an adapter-only unit)."""
    flags = [p.requires_grad for p in params]
    return bool(flags) and all(flags)


def _peft_names(model: torch.nn.Module) -> dict[str, str]:
    """``{state_dict name: PEFT saved name}`` for every trainable parameter of an unwrapped PEFT model.

    PEFT's own selection (``get_peft_model_state_dict``) returns the parameters themselves under their
    saved names; matching them by identity gives the renaming without restating PEFT's rules."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    saved = {id(tensor): key for key, tensor in get_peft_model_state_dict(model, state_dict=params).items()}
    names = {name: saved.get(id(param)) for name, param in params.items()}
    unnamed = [name for name, key in names.items() if key is None]
    if unnamed:
        raise RuntimeError(f"trainable parameters PEFT does not save: {unnamed[:3]}")
    return names


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


class AdapterState:
    """The trainable (adapter) parameters of ``model`` (a ``peft.PeftModel`` as built, before any strategy
    wraps it), as checkpoints save, check and load them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # Counted here, on the model as built: once FSDP (use_orig_params) or DeepSpeed ZeRO-3 has
        # wrapped it, a parameter's numel on a rank is the size of that rank's shard. The trainable set
        # does not change afterwards (lit_lora.models.builder.check_only_adapter_trainable).
        self.trainable_params = count_params(model)[0]
        self.peft_names = _peft_names(model)
        params = dict(model.named_parameters())
        self.peft_shapes = {peft: tuple(params[name].shape) for name, peft in self.peft_names.items()}

    @contextlib.contextmanager
    def full_params(self, strategy, writeback: bool = False) -> Iterator[None]:
        """Inside, every adapter parameter is whole on every rank; with any strategy but FSDP it does
        nothing. ``writeback`` keeps changes made inside.

        Under FSDP (a collective: enter it on every rank) only the units that hold the adapter are
        gathered: each LoRA A and B is a unit of its own (PEFT's wrap policy, lit_lora.training.strategies), so a
        save never gathers the frozen base. If some trainable parameter lives in a unit with frozen ones
        (another wrap policy, a trainable bias), the whole model is gathered instead, as before.
        """
        if not (isinstance(strategy, FSDPStrategy) and isinstance(strategy.model, FSDP)):
            yield
            return
        if getattr(strategy.model, "_is_root", None) is None:
            # FSDP not yet initialised (no forward, no optimizer-state load): summoning a child unit
            # first would make it a root and break the real root's initialisation. The whole model,
            # once, initialises it properly.
            with FSDP.summon_full_params(strategy.model, writeback=writeback):
                yield
            return
        units = [
            unit
            for unit in FSDP.fsdp_modules(strategy.model)
            if unit is not strategy.model and _all_trainable(unit.module.parameters())
        ]
        covered = {id(p) for unit in units for p in unit.module.parameters()}
        whole = any(p.requires_grad and id(p) not in covered for p in self.model.parameters())
        with contextlib.ExitStack() as stack:
            if whole:
                stack.enter_context(FSDP.summon_full_params(strategy.model, writeback=writeback))
            else:
                for unit in units:
                    stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=writeback))
            yield

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters (the tensors themselves) under their ``model.state_dict()`` names.

        Read from the parameters rather than from ``state_dict()``, which would visit the frozen base too
        (under FSDP, gathering it). Whole tensors inside :meth:`full_params` under FSDP. PEFT's
        ``get_peft_model_state_dict`` / ``save_pretrained(state_dict=...)`` take it as is."""
        return {
            name.replace(_FSDP_PREFIX, "").replace(_CHECKPOINT_PREFIX, ""): param
            for name, param in self.model.named_parameters()
            if param.requires_grad
        }

    def peft_weights(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's saved names (no adapter name): the parameters themselves.

        The names come from PEFT on the model as built (:func:`_peft_names`): PEFT finds adapter entries
        through the model's module names, which FSDP's wrappers change, so asked after wrapping it
        finds none (an FSDP run exported an empty adapter before this)."""
        return {self.peft_names[name]: param for name, param in self.state_dict().items()}

    def weights(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the adapter under PEFT's names (inside :meth:`full_params` under FSDP)."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.peft_weights().items()}

    def save_into(self, checkpoint: dict, step: int) -> None:
        """Replace Lightning's full ``state_dict`` in ``checkpoint`` with the adapter (PEFT names and
        config); call inside :meth:`full_params` under FSDP.

        Raises :class:`UserError` if an adapter weight is NaN or infinite: such a checkpoint would only
        resume a broken run.
        """
        weights = self.weights()
        broken = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
        if broken:
            raise UserError(
                f"step {step}: adapter weights are not finite ({broken[0]} and "
                f"{len(broken) - 1} more); no checkpoint saved. Lower optim.lr or set trainer.gradient_clip_val"
            )
        config = self.model.peft_config[self.model.active_adapter]
        checkpoint["adapter"] = {
            "weights": {name: tensor.contiguous() for name, tensor in weights.items()},
            "config": json.loads(json.dumps(config.to_dict(), default=_json_default)),
        }
        checkpoint["state_dict"] = {}  # the frozen base is never stored
        checkpoint["trainable_params"] = self.trainable_params

    def check_fits(self, checkpoint: dict) -> None:
        """Raise :class:`UserError` unless the checkpoint's adapter has exactly this model's adapter keys
        and shapes (the shapes as built, so that nothing is gathered: FSDP's strategy calls this before
        it loads the optimizer moments)."""
        adapter = checkpoint.get("adapter")
        if adapter is None:
            raise UserError(
                "the checkpoint holds no adapter weights; resume from a lit-lora checkpoint folder"
            )
        expected, given = set(self.peft_shapes), set(adapter["weights"])
        if given != expected:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise UserError(
                f"the checkpoint's adapter does not fit this model: {len(missing)} missing keys "
                f"{missing[:2]}, {len(unexpected)} unexpected keys {unexpected[:2]} "
                "(same model and lora settings as the run that saved it?)"
            )
        for name, tensor in adapter["weights"].items():
            if tuple(tensor.shape) != self.peft_shapes[name]:
                raise UserError(
                    f"the checkpoint's adapter does not fit this model: {name} is {tuple(tensor.shape)} "
                    f"there, {self.peft_shapes[name]} here (same lora.r and target modules as the run "
                    "that saved it?)"
                )
        count = self.trainable_params
        if checkpoint.get("trainable_params", count) != count:
            raise UserError(
                f"trainable parameters changed on resume: {checkpoint.get('trainable_params')} saved, {count} now"
            )

    def load_from(self, checkpoint: dict) -> None:
        """Copy the adapter of a checkpoint (:meth:`check_fits` first) into the parameters; call inside
        :meth:`full_params` with ``writeback`` under FSDP."""
        with torch.no_grad():
            own = self.peft_weights()
            for name, tensor in checkpoint["adapter"]["weights"].items():
                own[name].copy_(tensor.to(device=own[name].device, dtype=own[name].dtype))
