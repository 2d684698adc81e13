"""Lightning strategies from ``trainer.strategy``: DDP and FSDP (with QLoRA).

lit-lora has no distributed code of its own: every name maps to a Lightning strategy. Plain names
(``auto``, ``ddp``, ``ddp_spawn``...) go to ``lightning.Trainer`` unchanged. ``fsdp`` is built here
because FSDP needs to know the model. It follows the published FSDP + QLoRA recipe (bitsandbytes,
PEFT, TRL), in which FSDP flattens every wrapped unit into one flat parameter of ONE dtype:

- units: PEFT's :func:`peft.utils.other.fsdp_auto_wrap_policy`, i.e. one unit per decoder layer (the
  model's ``_no_split_modules`` classes) holding the frozen base weights, and one unit per trainable
  leaf (each LoRA A and B): the adapter keeps its float32 storage while the base stays in its own dtype;
- the base is built for it (``build_model`` of a config with ``trainer.strategy=fsdp``): no float32 upcast of norms and
  embeddings, no frozen linears cast to bf16, and a 4-bit storage dtype equal to the compute dtype
  (``build_model``), so that each decoder layer is uniform (:func:`flat_param_dtypes` checks it);
- mixed precision computes in autocast's dtype (for a 4-bit base, its compute and storage dtype) and
  reduces gradients in float32; buffers (RoPE frequencies) are left as they are;
- activation checkpointing (``model.gradient_checkpointing=true``) is applied by FSDP per decoder layer,
  and transformers' own is then off (one mechanism, not two);
- checkpoints: :class:`AdapterFSDPStrategy` saves and loads lit-lora's adapter-only checkpoint folders
  through the CheckpointIO plugin (Lightning's own FSDP save refuses an existing folder and its load
  expects a file or ``meta.pt``), and never gathers the frozen base to do it.

DeepSpeed is refused at config time (:func:`lit_lora.config.device.check_device`): its checkpoints bypass the
CheckpointIO plugin and ZeRO-3 partitions the weights the loss and the adapter export read.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import torch

from lit_lora.config.schema import TrainConfig
from lit_lora.errors import UserError
from lit_lora.models.placement import is_fsdp, sharded_storage_dtype


def fsdp_storage_dtype(cfg: TrainConfig) -> str | None:
    """:func:`sharded_storage_dtype` when the run uses FSDP and it differs from ``quant.storage_dtype``,
    else None (train.py records it in the config before ``config.yaml`` is written)."""
    if not is_fsdp(cfg.trainer.strategy):
        return None
    storage = sharded_storage_dtype(cfg.quant)
    return storage if storage != cfg.quant.storage_dtype else None


def fsdp_wrap_policy(model: torch.nn.Module):
    """FSDP's ``auto_wrap_policy`` for a PEFT model: PEFT's own (decoder layers + trainable leaves)."""
    from peft.utils.other import fsdp_auto_wrap_policy

    decoder_layer_classes(model)  # a clear error when the model has no known decoder layer class
    return fsdp_auto_wrap_policy(model)


def flat_param_dtypes(model: torch.nn.Module, policy) -> dict[str, set[torch.dtype]]:
    """The dtypes each FSDP unit would flatten together, computed from ``policy`` without wrapping.

    Keys are the unit's module path ("" for the root). FSDP raises "Must flatten tensors with uniform
    dtype" for any unit with two; this lets a CPU test (and :func:`build_strategy`) see it first.
    """
    units: dict[str, set[torch.dtype]] = {}

    def visit(module: torch.nn.Module, path: str, owner: str) -> None:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            numel = sum(p.numel() for p in child.parameters())
            wraps = policy(module=child, recurse=False, nonwrapped_numel=numel)
            visit(child, child_path, child_path if wraps else owner)
        for param in module.parameters(recurse=False):
            units.setdefault(owner, set()).add(param.dtype)

    visit(model, "", "")
    return units


def check_uniform_units(model: torch.nn.Module, policy) -> None:
    """Raise (a bug, not a user mistake) if an FSDP unit would mix dtypes; names the first such unit."""
    mixed = {path: dtypes for path, dtypes in flat_param_dtypes(model, policy).items() if len(dtypes) > 1}
    if mixed:
        path, dtypes = next(iter(mixed.items()))
        raise RuntimeError(
            f"FSDP unit {path or '<root>'!r} would mix dtypes {sorted(map(str, dtypes))} "
            f"({len(mixed)} such unit(s)); the model was not built for FSDP (lit_lora.models.builder.build_model with trainer.strategy=fsdp)"
        )


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The classes of ``model``'s decoder layers, from transformers' ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    classes = {type(m) for m in base.modules() if type(m).__name__ in names}
    if not classes:
        raise UserError(
            f"trainer.strategy=fsdp: cannot find the decoder layers of {type(base).__name__} "
            "(no _no_split_modules); use trainer=ddp or a DeepSpeed strategy"
        )
    return classes


# The DDP names that start their ranks through Lightning's subprocess launcher (``ddp_spawn``, ``ddp_fork``
# and ``ddp_notebook`` start them another way and keep Lightning's strategy as it is).
DDP_NAMES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


def build_strategy(cfg: TrainConfig, built: Any) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer`` for ``cfg.trainer.strategy``; ``built`` is the
    :class:`lit_lora.models.builder.BuiltModel` of the run (its model, compute dtype and checkpointing choice).

    DDP and FSDP get ``trainer.process_group_timeout_s`` and lit-lora's launcher
    (:mod:`lit_lora.training.launcher`: a rank that dies is reported and the others leave)."""
    name = cfg.trainer.strategy
    model = built.model
    timeout = datetime.timedelta(seconds=cfg.trainer.process_group_timeout_s)
    if name in DDP_NAMES:
        return _watched_ddp_strategy_class()(
            timeout=timeout, find_unused_parameters=name == "ddp_find_unused_parameters_true"
        )
    if not is_fsdp(name):
        return name
    from torch.distributed.fsdp import MixedPrecision

    layers = decoder_layer_classes(model)
    policy = fsdp_wrap_policy(model)
    check_uniform_units(model, policy)
    precision = cfg.trainer.precision
    mixed = None
    if precision.endswith("-mixed"):
        # Units compute in autocast's dtype (PEFT's LoRA layer skips its own casts under autocast); for a
        # 4-bit base it is the storage dtype (lit_lora.config.schema refuses any other precision), so the packed
        # bytes are never cast. Gradients reduce in float32; buffers keep their dtype (RoPE's inverse
        # frequencies would lose precision in bf16). Other precisions: Lightning's FSDP defaults.
        mixed = MixedPrecision(param_dtype=built.compute_dtype, reduce_dtype=torch.float32, buffer_dtype=None)
    return AdapterFSDPStrategy(
        auto_wrap_policy=policy,
        mixed_precision=mixed,
        activation_checkpointing_policy=layers if built.checkpointing == "fsdp" else None,
        sharding_strategy="SHARD_GRAD_OP" if name == "fsdp_grad_op" else "FULL_SHARD",
        timeout=timeout,
        # Each LoRA leaf is its own unit, but the optimizer and PEFT address the original parameters.
        use_orig_params=True,
        state_dict_type="full",
    )


def _watch_ranks(strategy_class):
    """``strategy_class`` whose subprocess launcher is lit-lora's :class:`~lit_lora.training.launcher.WatchedLauncher`."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    from lit_lora.training.launcher import WatchedLauncher

    class Watched(strategy_class):
        def _configure_launcher(self) -> None:
            super()._configure_launcher()
            if type(self._launcher) is _SubprocessScriptLauncher:
                self._launcher = WatchedLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    Watched.__name__ = Watched.__qualname__ = f"Watched{strategy_class.__name__}"
    return Watched


@functools.cache
def _watched_ddp_strategy_class():
    """Lightning's DDPStrategy with lit-lora's launcher (defined lazily: importing this module stays light)."""
    from lightning.pytorch.strategies import DDPStrategy

    return _watch_ranks(DDPStrategy)


@functools.cache
def _adapter_fsdp_strategy_class():
    """:class:`AdapterFSDPStrategy`, defined lazily so that importing this module stays light."""
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    class AdapterFSDPStrategy(_watch_ranks(FSDPStrategy)):
        """Lightning's FSDP with lit-lora's adapter-only checkpoint folders (``lit_lora.training.checkpoint_io``).

        Saving: the checkpoint dict's ``state_dict`` is empty (``LitLoRA.on_save_checkpoint`` puts the
        adapter in), so the frozen base is never gathered; optimizer states are gathered in full to rank
        zero (Lightning's ``optimizer_state``; only the adapter has any) and rank zero writes the folder
        through the CheckpointIO plugin, replacing an existing one atomically. Loading: every rank reads
        the folder; the adapter is loaded by ``LitLoRA.on_load_checkpoint``, the optimizer states here.
        """

        def lightning_module_state_dict(self) -> dict[str, Any]:
            return {}

        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            # On the CPU (trainer.accelerator=cpu, gloo: tests of the sharded path) torch's FSDP needs
            # device_id=cpu said explicitly; Lightning passes the device index, which is None there.
            if self.root_device.type != "cpu":
                return super()._setup_model(model)
            from torch.distributed.fsdp import FullyShardedDataParallel

            if "mixed" in self.precision_plugin.precision:
                # Lightning's FSDP precision autocasts on "cuda" only: on the CPU, without autocast, PEFT
                # casts inputs to the adapter's float32 (read outside its unit) and FSDP computes in bf16.
                self.precision_plugin = _cpu_autocast_precision(self.precision_plugin.precision)

            wrapped = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            # Lightning's own setup of an already wrapped model: torchmetrics' device and, above all, the
            # activation checkpointing policy (model.gradient_checkpointing=true), as on a GPU.
            self.kwargs.pop("auto_wrap_policy", None)
            return super()._setup_model(wrapped)

        def setup(self, trainer) -> None:
            super().setup(trainer)
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

            wrapped = sum(isinstance(m, CheckpointWrapper) for m in self.model.modules())
            if wrapped and self.is_global_zero:
                print(f"lit-lora: FSDP activation checkpointing on {wrapped} decoder layers", flush=True)

        def optimizer_state(self, optimizer) -> dict[str, Any]:
            """Rank zero: the full optimizer state keyed by position in the optimizer (as a plain torch
            optimizer numbers its parameters), so checkpoints move between FSDP, DDP and one device.
            Lightning numbers by position in the whole model, which another strategy would misread."""
            from lightning.pytorch.core.optimizer import LightningOptimizer
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import OptimStateKeyType

            optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            with _full_state_dict_type(self.model, self.root_device):
                state = FSDP.optim_state_dict(self.model, optimizer)
                if self.global_rank == 0:
                    state = FSDP.rekey_optim_state_dict(
                        state, OptimStateKeyType.PARAM_ID, self.model, optim=optimizer
                    )
            return state

        def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            self.barrier("AdapterFSDPStrategy.save_checkpoint")

        def remove_checkpoint(self, filepath) -> None:
            if self.is_global_zero:
                self.checkpoint_io.remove_checkpoint(filepath)

        def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import OptimStateKeyType

            checkpoint = self.checkpoint_io.load_checkpoint(self.broadcast(checkpoint_path))
            # The adapter must fit before its optimizer moments are loaded (else a torch traceback).
            self.lightning_module.check_adapter_fits(checkpoint)
            states = checkpoint.get("optimizer_states")
            if not states or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
                return checkpoint
            with _full_state_dict_type(self.model, self.root_device, rank0_only=False):
                for optimizer, state in zip(self.optimizers, states, strict=True):
                    if state.get("state") and isinstance(next(iter(state["state"])), int):
                        # Positions in the optimizer (optimizer_state above, DDP, one device) -> names.
                        state = FSDP.rekey_optim_state_dict(
                            state, OptimStateKeyType.PARAM_NAME, self.model, optim=optimizer
                        )
                    flat = FSDP.optim_state_dict_to_load(
                        model=self.model, optim=optimizer, optim_state_dict=state
                    )
                    optimizer.load_state_dict(flat)
            return checkpoint

    return AdapterFSDPStrategy


def _full_state_dict_type(model: torch.nn.Module, device: torch.device, rank0_only: bool = True):
    """FSDP's full (unsharded) state-dict context for model and optimizer states, offloaded to the CPU
    from a GPU.

    Not "offloaded" when training on the CPU: torch's FSDP gathers every optimizer state (exp_avg,
    exp_avg_sq) of a unit into ONE reused buffer and, with offload on, keeps ``value.cpu()`` of its
    views, which on the CPU is the view itself: each state was overwritten by the next (a checkpoint
    held exp_avg_sq as exp_avg; seen on 2 CPU ranks, torch 2.13, ``_allgather_orig_param_states``).
    Without offload it clones each view."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = device.type != "cpu"
    return FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    )


def _cpu_autocast_precision(precision: str):
    """Lightning's FSDP precision plugin with its autocast on the CPU (``bf16-mixed``: the CPU tests)."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    class CPUAutocastFSDPPrecision(FSDPPrecision):
        def forward_context(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    return CPUAutocastFSDPPrecision(precision)


def AdapterFSDPStrategy(**kwargs):
    """An instance of the FSDP strategy described in :func:`_adapter_fsdp_strategy_class`."""
    return _adapter_fsdp_strategy_class()(**kwargs)


def scoring_device(strategy: Any) -> torch.device | None:
    """The device held-out scoring runs on after ``fit``: the one training used (``root_device``), or
    None under a sharded strategy (FSDP, DeepSpeed), whose wrapped layers only run collectively.

    Needed because Lightning's ``Strategy.teardown`` moves the module to the CPU at the end of ``fit``:
    taken from the parameters, the device would be the CPU after a GPU run (generation through
    bitsandbytes' CPU kernels, hours for a 7B model)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        return None
    return strategy.root_device
