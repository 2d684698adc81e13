"""Checks of a training config against the machine it runs on (CUDA devices, strategies), made before
any weight is loaded. Kept apart from the schema's own checks (:mod:`lit_lora.config.schema`) so that
CUDA presets still compose on any machine and fail only when a run would start."""

from __future__ import annotations

from lit_lora.config.schema import TrainConfig, TrainerConfig
from lit_lora.errors import UserError

# Strategy names (lit_lora.training.strategies) that need CUDA devices. FSDP is the exception when asked for on
# the CPU explicitly (trainer.accelerator=cpu: gloo, for tests of the sharded path; slow, never a
# default). The check lives here so that it runs before any weight is loaded.
CUDA_ONLY_STRATEGIES = ("fsdp",)


def planned_world_size(trainer: TrainerConfig, cuda_count: int) -> int:
    """How many processes ``trainer.devices`` x ``trainer.num_nodes`` asks for, as Lightning reads
    ``devices``: a count, a list or ``"0,1"`` string of indices, or ``-1`` / ``"auto"`` (every GPU here;
    1 on the CPU)."""
    devices = trainer.devices
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else devices.strip()
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif devices in (-1, "-1", "auto"):
        per_node = cuda_count if str(trainer.accelerator) != "cpu" and cuda_count else 1
    else:
        per_node = int(devices)
    return per_node * max(1, int(trainer.num_nodes))


def check_strategy_combinations(cfg: TrainConfig) -> None:
    """Combinations that cannot train correctly, refused with the reason and the alternative.

    - ``trainer.precision=16-true``: the adapter's weights and AdamW's state in fp16, where ``eps=1e-8``
      rounds to 0 while LoRA A's first gradient is exactly 0 (B starts at 0): 0/0, a NaN loss at step 2
      (seen on an NVIDIA H200, 2026-11-30).
    - DeepSpeed: Lightning's DeepSpeed save bypasses the CheckpointIO plugin (pickled folders with the
      frozen base, which ``resume`` does not recognise), and ZeRO-3 partitions ``lm_head.weight``, which
      the chunked loss reads outside a forward, and the adapter the export saves. Not shipped until it
      is fixed and run on GPUs.
    - FSDP with a 4-bit base and a precision other than the compute dtype's mixed precision: FSDP would
      cast the packed 4-bit storage to another dtype.
    - FSDP with ``optim=paged_adamw_8bit`` (its 8-bit state cannot be gathered into a checkpoint), and
      FSDP strategy names lit-lora does not build (``fsdp_cpu_offload``: its options would be dropped).
    - FSDP with ``objective.precompute_ref``: the pass before training would run outside FSDP's forward.
    - FSDP with ``quant=int8``: 8-bit weights are integers, which FSDP cannot flatten with the float
      weights of the same layer (the published FSDP + QLoRA recipe is 4-bit).
    """
    strategy = str(cfg.trainer.strategy)
    if cfg.trainer.precision == "16-true":
        raise UserError(
            "trainer.precision=16-true trains the adapter and AdamW's state in fp16, where eps=1e-8 is 0: "
            "the loss is NaN from step 2. Use 16-mixed (fp16 compute, fp32 adapter) or bf16-mixed"
        )
    if strategy.startswith("deepspeed"):
        raise UserError(
            f"trainer.strategy={strategy} is not supported: DeepSpeed's checkpoints bypass lit-lora's "
            "adapter checkpoints (resume would restart at step 0) and ZeRO-3 partitions weights the loss "
            "and the adapter export read. Use trainer=fsdp (sharded, with QLoRA) or trainer=ddp"
        )
    if strategy.startswith("fsdp") and cfg.quant.method in ("nf4", "fp4"):
        wanted = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}.get(cfg.quant.compute_dtype)
        if cfg.trainer.precision != wanted:
            # FSDP's mixed precision casts each flat parameter to param_dtype: with 4-bit weights stored
            # in the compute dtype, any other param_dtype would reinterpret their packed bytes.
            raise UserError(
                f"trainer.strategy=fsdp with quant={cfg.quant.method} and quant.compute_dtype="
                f"{cfg.quant.compute_dtype} needs trainer.precision={wanted} (got {cfg.trainer.precision})"
                if wanted
                else f"trainer.strategy=fsdp with quant={cfg.quant.method} needs a 16-bit quant.compute_dtype "
                "(bfloat16 with trainer.precision=bf16-mixed, or float16 with 16-mixed)"
            )
    if strategy.startswith("fsdp") and strategy not in ("fsdp", "fsdp_grad_op"):
        raise UserError(
            f"trainer.strategy={strategy} is not built by lit-lora (its options would be dropped); "
            "use trainer.strategy=fsdp or fsdp_grad_op"
        )
    if strategy.startswith("fsdp") and cfg.optim.name == "paged_adamw_8bit":
        raise UserError(
            "trainer.strategy=fsdp cannot gather optim=paged_adamw_8bit's state for a checkpoint (8-bit "
            "moments with float32 block scales per parameter; FSDP's full optimizer state needs one dtype "
            "and the shard's shape); use optim=adamw with FSDP"
        )
    if strategy.startswith("fsdp") and cfg.objective.precompute_ref:
        # The pass before training calls the model outside the root FSDP unit's forward, where the
        # weights are still sharded; not built yet.
        raise UserError(
            "objective.precompute_ref=true is not supported with trainer.strategy=fsdp yet; under FSDP the "
            "reference runs at every step (set objective.precompute_ref=false)"
        )
    if strategy.startswith("fsdp") and cfg.quant.method == "int8":
        raise UserError(
            "trainer.strategy=fsdp cannot shard quant=int8 (integer weights beside float ones in a layer); "
            "use quant=nf4 with FSDP, or trainer=ddp with int8"
        )


def check_device(cfg: TrainConfig) -> None:
    """Options the chosen accelerator cannot serve; each message says the fix.

    Runs before any weight or row is loaded (a 7B model must not load for minutes only to be refused).
    A CUDA-only option (FSDP or DeepSpeed strategies, ``16-mixed`` / ``16-true`` precision, paged 8-bit
    AdamW) is refused when this machine has no CUDA device, or when ``trainer.accelerator=cpu`` asks
    not to use it. Kept apart from :func:`check_cross_fields` so that CUDA presets still compose and
    validate on a CPU machine.
    """
    import torch  # here, not at import: composing configs must stay fast

    accelerator = str(cfg.trainer.accelerator)
    devices = cfg.trainer.devices
    has_cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise UserError(
            f"trainer.accelerator={accelerator} needs a CUDA device; use trainer.accelerator=cpu (or auto)"
        )
    if has_cuda and accelerator in ("gpu", "cuda", "auto") and isinstance(devices, int):
        count = torch.cuda.device_count()
        if devices > count:
            raise UserError(
                f"trainer.devices={devices} but this machine has {count} GPU(s); set trainer.devices<={count}"
            )
    on_cuda = has_cuda and accelerator in ("gpu", "cuda", "auto")
    where = "this machine has none" if not has_cuda else f"trainer.accelerator={accelerator} does not use it"
    strategy = str(cfg.trainer.strategy)
    check_strategy_combinations(cfg)
    if strategy.startswith(CUDA_ONLY_STRATEGIES) and not on_cuda and accelerator != "cpu":
        raise UserError(
            f"trainer.strategy={strategy} needs a CUDA device, but {where}; use trainer=ddp (gloo on CPU), "
            "or add trainer.accelerator=cpu to test the sharded path on the CPU (slow)"
        )
    if strategy.startswith("fsdp") and planned_world_size(cfg.trainer, torch.cuda.device_count()) < 2:
        # torch's FSDP falls back to NO_SHARD on one process, where a model with tied embeddings and a
        # 4-bit base fails at its second forward (an assertion in FSDP's unsharded views, seen on CPU).
        raise UserError(
            "trainer.strategy=fsdp with one device has nothing to shard; use the default trainer on one "
            "device, or trainer.devices>=2"
        )
    if on_cuda:
        return
    if cfg.trainer.precision.startswith("16"):
        raise UserError(
            f"trainer.precision={cfg.trainer.precision} needs a CUDA device, but {where}; "
            "on CPU use bf16-mixed, bf16-true or 32"
        )
    # lora.init=loftq is checked by the model builder (lit_lora.models.builder), before any weight loads.
    if cfg.optim.name == "paged_adamw_8bit":
        raise UserError(f"optim=paged_adamw_8bit needs a CUDA device, but {where}; use optim=adamw")
