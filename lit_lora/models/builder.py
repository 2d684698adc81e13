"""The one model builder: :func:`build_model` turns a run's config into the model every command uses.

Training: check targets -> load the base (quantized on load) -> prepare for k-bit training and
activation checkpointing -> wrap with the adapter (new, or ``lora.init_from``) -> the speed paths
(:mod:`lit_lora.speedups`). The commands after training (merge, generate, evaluate) get the base the
same way, with an adapter attached for inference. Each decision has one function here:
:func:`bnb_config` (quantization), :func:`compute_dtype`, :func:`checkpointing` (which activation
checkpointing mechanism), :func:`lit_lora.speedups.apply_speedups` (which speed paths).

Adapter targets are checked first, on a weightless (meta-device) copy of the architecture whenever the
architecture is known without a download, so a wrong module name fails in seconds with the list of
names the model does have.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_lora.config.schema import LoraConfig, ModelConfig, QuantConfig, TrainConfig
from lit_lora.errors import UserError
from lit_lora.models import embedded
from lit_lora.models.adapters import attach_adapter, check_adapter_folder, load_reference
from lit_lora.models.placement import cuda_index_for, is_fsdp, sharded_storage_dtype
from lit_lora.network import hub_host, hub_reachable
from lit_lora.process import local_rank
from lit_lora.speedups import Speedups, apply_speedups
from lit_lora.staging import staged_folder

# The attention projections of each architecture, as PEFT target names (suffixes of module paths).
ATTENTION_TARGETS = {
    "gpt2": ["c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "attention.dense"],
    "falcon": ["query_key_value", "self_attention.dense"],
}
PRESETS = ("attention", "all-linear")


@dataclass
class BuiltModel:
    """What :func:`build_model` returns: the model, its tokenizer and what callers would otherwise
    recompute (the dtype frozen weights compute in, the speed paths applied, parameter counts)."""

    model: torch.nn.Module  # peft.PeftModel when an adapter is on (always for training)
    tokenizer: object
    source: str  # the folder or hub id the weights came from
    trainable_params: int
    total_params: int  # 4-bit weights counted unpacked (count_params)
    target_modules: list[str] | str | None  # None: the base alone
    compute_dtype: torch.dtype  # what the frozen base computes in (compute_dtype)
    quantized: bool
    speedups: Speedups  # all off for inference builds and under speed=off
    checkpointing: str  # "none", "transformers" or "fsdp" (checkpointing)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


@dataclass
class BaseConfig:
    """The groups every command shares: which base model, and how training quantized it. The configs of
    merge, generate and evaluate carry these two; scripts that only need a base pass this."""

    model: ModelConfig
    quant: QuantConfig = field(default_factory=QuantConfig)


# ---------------------------------------------------------------------------------------------- targets
def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections are Conv1D, not nn.Linear

    return isinstance(module, nn.Linear | Conv1D) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def linear_module_paths(model: nn.Module) -> list[str]:
    """Full paths of the modules LoRA can wrap (linear layers, GPT-2 Conv1D, bitsandbytes linears)."""
    return [name for name, module in model.named_modules() if name and _is_linear(module)]


def resolve_targets(requested: list[str], model_type: str | None, paths: list[str]) -> list[str] | str:
    """Turn ``lora.target_modules`` into PEFT's ``target_modules`` and check every name matches.

    Raises :class:`UserError` naming the unmatched targets and listing the linear module names the
    model has (GPT-2: ``c_attn``, ``c_fc``, ``c_proj``).
    """
    if requested == ["all-linear"]:
        return "all-linear"
    if requested == ["attention"]:
        if model_type not in ATTENTION_TARGETS:
            raise UserError(
                f"no 'attention' target preset for architecture {model_type!r}; list the modules, e.g. "
                f"lora.target_modules=[{','.join(sorted({p.rsplit('.', 1)[-1] for p in paths})[:4])}]"
            )
        requested = ATTENTION_TARGETS[model_type]
    if any(name in PRESETS for name in requested):
        raise UserError(f"presets ({', '.join(PRESETS)}) cannot be mixed with module names: {requested}")
    missing = [t for t in requested if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise UserError(
            f"lora.target_modules {missing} match no linear module of this {model_type or 'model'}; "
            f"its linear modules are: {', '.join(leaf_names)} (or use a preset: {', '.join(PRESETS)})"
        )
    return list(requested)


def _skeleton(config) -> nn.Module:
    """The architecture on the meta device: module names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_targets_early(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> list[str] | str | None:
    """Check targets before any weight or hub access when ``model.model_type`` is set.

    Returns the resolved targets, or None when the architecture is only known after loading the config.
    """
    if not model_cfg.model_type:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_cfg.model_type, **model_cfg.config_overrides)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"model.model_type={model_cfg.model_type!r} is not an architecture transformers knows: {err}"
        ) from err
    return resolve_targets(lora_cfg.target_modules, config.model_type, linear_module_paths(_skeleton(config)))


# ---------------------------------------------------------------------------------------------- sources
def _random_init_folder(model_cfg: ModelConfig) -> Path:
    """Materialise a random-init model (seed 0) as a local folder, so quantization loads it like any other."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_overrides(AutoConfig.for_model(model_cfg.model_type), model_cfg.config_overrides)
    config = AutoConfig.for_model(model_cfg.model_type, **model_cfg.config_overrides)
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    target = embedded.cache_root() / "random" / f"{model_cfg.model_type}-{key}"
    if (target / "config.json").is_file():
        return target
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    # Another process (a DDP rank, a parallel sweep job) may publish the same folder first: keep theirs.
    with staged_folder(target, keep_if_has="config.json", mode=0o700) as tmp:
        model.save_pretrained(tmp)
    return target


def resolve_source(model_cfg: ModelConfig) -> tuple[str, bool]:
    """Return ``(folder or hub id, local_files_only)``; fails fast when a hub model cannot be reached."""
    name = model_cfg.name_or_path
    if model_cfg.random_init:
        return str(_random_init_folder(model_cfg)), True
    if embedded.is_embedded(name):
        return str(embedded.resolve(name)), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path={name} is a folder without config.json")
        return str(path), True
    if path.exists() or name.startswith((".", "/", "~")):
        raise UserError(
            f"model.name_or_path={name} is not a model folder (it must hold config.json and weights)"
        )
    return name, not hub_reachable()


def _hub_kwargs(model_cfg: ModelConfig, local_only: bool) -> dict:
    """Arguments every ``from_pretrained`` call of a run shares."""
    return {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "local_files_only": local_only,
    }


def _load_config(source: str, local_only: bool, model_cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **_hub_kwargs(model_cfg, local_only))
    except (OSError, ValueError) as err:
        if local_only and not Path(source).is_dir():
            raise UserError(
                f"model {source!r} is not in the local Hugging Face cache and the hub ({hub_host()}) "
                f"cannot be reached. Point at a local copy instead: model.name_or_path=/path/to/folder "
                f"(a folder with config.json, weights and tokenizer), or make the hub reachable"
            ) from err
        raise UserError(f"cannot load the config of model {source!r}: {str(err).splitlines()[0]}") from err
    _check_overrides(config, model_cfg.config_overrides)
    for key, value in model_cfg.config_overrides.items():
        setattr(config, key, value)
    return config


def load_config(model_cfg: ModelConfig):
    """The transformers config of ``model`` (overrides applied), without loading any weight."""
    source, local_only = resolve_source(model_cfg)
    return _load_config(source, local_only, model_cfg)


def _check_overrides(config, overrides) -> None:
    """A typo in ``model.config_overrides`` would silently add an attribute that nothing reads."""
    for key in overrides:
        if not hasattr(config, key):
            raise UserError(
                f"model.config_overrides.{key}: {type(config).__name__} has no such field "
                f"(e.g. {', '.join(sorted(k for k in config.to_dict() if not k.startswith('_'))[:6])}...)"
            )


def load_tokenizer(model_cfg: ModelConfig, source: str, local_only: bool):
    """The tokenizer of ``model.tokenizer`` (default: the model's own), with a pad token set."""
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or source
    if embedded.is_embedded(name):
        name, local_only = str(embedded.resolve(name)), True
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **_hub_kwargs(model_cfg, local_only))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {name!r}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        # Padding positions carry label -100 and attention mask 0, so which id fills them is irrelevant.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- quantization
def bnb_config(quant_cfg: QuantConfig):
    """A transformers ``BitsAndBytesConfig`` for ``quant``, after checking bitsandbytes can serve it here."""
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except Exception as err:  # an import failure of a compiled library can raise anything
        raise UserError(
            f"quant={quant_cfg.method} needs bitsandbytes, which does not import here: {err}"
        ) from err
    on_cuda = torch.cuda.is_available()
    version = tuple(int(x) for x in bnb.__version__.split(".")[:2] if x.isdigit())
    if not on_cuda and version < (0, 49):
        raise UserError(
            f"quant={quant_cfg.method} on CPU needs bitsandbytes >= 0.49 (found {bnb.__version__}); "
            "upgrade it or use quant=none"
        )
    if quant_cfg.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.method,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant_cfg.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant_cfg.storage_dtype),
    )


# ---------------------------------------------------------------------------------------------- builder
def _peft_lora_config(lora_cfg: LoraConfig, targets: list[str] | str):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    init: bool | str = {"default": True, "gaussian": "gaussian"}.get(lora_cfg.init, lora_cfg.init)
    extra = {}
    if lora_cfg.init == "loftq":
        from peft import LoftQConfig

        # LoftQ initialises A/B against the 4-bit quantization error of the base (one alternating step).
        extra["loftq_config"] = LoftQConfig(loftq_bits=4, loftq_iter=1)
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        bias=lora_cfg.bias,
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
        init_lora_weights=init,
        **extra,
    )


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked element number."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit" and param.quant_state is not None:
            # Packed storage -> unpacked count; one not yet quantized still holds every element.
            n = int(param.quant_state.shape.numel())
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def check_only_adapter_trainable(model: nn.Module) -> None:
    """Raise if any parameter outside the adapter requires grad (the base must stay frozen)."""
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if stray:
        raise RuntimeError(f"parameters outside the adapter require grad: {stray[:5]}")


# safetensors' names of the floating dtypes a checkpoint stores weights in.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


def stored_dtype(source: str, config) -> torch.dtype:
    """The narrowest dtype that holds every floating weight of checkpoint ``source`` exactly.

    A local folder is read from its safetensors headers (no weights are read); bf16 and fp16 weights
    in one checkpoint give float32, which holds both. A hub id, or a folder without safetensors, falls
    back to the dtype its ``config.json`` declares (``dtype``, formerly ``torch_dtype``), and to
    float32, transformers' own default, when it declares none.
    """
    from safetensors import safe_open

    found: set[torch.dtype] = set()
    folder = Path(source)
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open objects are not iterable)
                    # Integer buffers and 8-bit formats say nothing about the precision of the weights.
                    dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                    if dtype is not None:
                        found.add(dtype)
    if not found:
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        found.add(
            declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32
        )
    result = found.pop()
    for dtype in found:
        result = torch.promote_types(result, dtype)
    return result


def quantized_device_map(cuda_index: int | None, cuda_available: bool) -> dict | None:
    """``device_map`` for a bitsandbytes load: the training GPU, or the CPU said explicitly on a GPU host
    (given no map, transformers' bitsandbytes quantizers pick the current CUDA device, so
    ``trainer.accelerator=cpu`` would load the base onto cuda:0); None on a machine without CUDA."""
    if cuda_index is not None:
        return {"": cuda_index}
    return {"": "cpu"} if cuda_available else None


def compute_dtype(
    model_cfg: ModelConfig, quant_cfg: QuantConfig, precision: str | None = None
) -> torch.dtype:
    """The dtype the frozen base computes in: a quantized base dequantizes to ``quant.compute_dtype``
    (it is also the dtype a quantized load uses, so merge re-quantizes exactly as training did); an
    unquantized one computes in the 16-bit dtype of a 16-bit ``precision`` (autocast's, or the
    weights' own under ``*-true``), else in its storage dtype ``model.dtype``."""
    if quant_cfg.enabled:
        return getattr(torch, quant_cfg.compute_dtype)
    if precision is not None and precision.startswith("bf16"):
        return torch.bfloat16
    if precision is not None and precision.startswith("16"):
        return torch.float16
    return getattr(torch, model_cfg.dtype)


def checkpointing(cfg: TrainConfig) -> str:
    """Which activation checkpointing a training run uses: ``"none"``; ``"fsdp"`` under FSDP (Lightning's
    per decoder layer, applied by the strategy: :func:`lit_lora.training.strategies.build_strategy`);
    ``"transformers"`` otherwise (non-reentrant, applied by :func:`build_model`). Never both."""
    if not cfg.model.gradient_checkpointing:
        return "none"
    return "fsdp" if is_fsdp(cfg.trainer.strategy) else "transformers"


def load_base(
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype | None,
    quantization=None,
    cuda_index: int | None = None,
    export_dtype: torch.dtype | None = None,
):
    """``(model, tokenizer, source, config)``: a step of :func:`build_model`, which decides its arguments.

    The hub check happens before any weight is read. Weights load in ``dtype``; with ``export_dtype``
    (merge, any export) they load instead at the precision the checkpoint stores them in
    (:func:`stored_dtype`), never below ``export_dtype``: an export starts from the base as stored, not
    from the copy rounded for training. ``quantization`` (a ``BitsAndBytesConfig``) quantizes on load on
    GPU ``cuda_index`` (None: bitsandbytes' CPU path); unquantized bases load on the CPU and Lightning
    moves them.
    """
    from transformers import AutoModelForCausalLM

    source, local_only = resolve_source(model_cfg)
    config = _load_config(source, local_only, model_cfg)
    tokenizer = load_tokenizer(model_cfg, source, local_only)
    if export_dtype is not None:
        dtype = torch.promote_types(stored_dtype(source, config), export_dtype)
    device_map = (
        quantized_device_map(cuda_index, torch.cuda.is_available()) if quantization is not None else None
    )
    try:
        base = AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            **_hub_kwargs(model_cfg, local_only),
            dtype=dtype,
            quantization_config=quantization,
            attn_implementation=model_cfg.attn_implementation,
            device_map=device_map,
        )
    except OSError as err:
        raise UserError(f"cannot load the weights of {source!r}: {str(err).splitlines()[0]}") from err
    return base, tokenizer, source, config


def keep_4bit_layers_trainable_on_cpu(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of ``model``; returns how many.

    On a CPU with AVX512-BF16, a ``Linear4bit`` called in eval mode without gradients repacks its weight
    into a CPU inference layout and from then on runs a kernel that has no backward: no gradient passes
    through that layer any more (the LoRA layers before it stop training) until a ``state_dict()`` undoes
    the repack. A training model decodes in eval mode without gradients (validation, GRPO's rollouts,
    held-out scoring), so the repack is kept off: those forwards take the trainable path instead."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def build_model(
    cfg: TrainConfig | BaseConfig,
    *,
    adapter: str | Path | None = None,
    export_dtype: torch.dtype | None = None,
    cuda_index: int | str | None = "auto",
) -> BuiltModel:
    """The model of a run, built from its config. Raises :class:`UserError` for every mistake a user can
    fix: unknown model, unreachable hub, target modules that match nothing, quantization bitsandbytes
    cannot run here, an adapter that does not fit.

    - ``cfg`` a :class:`~lit_lora.config.schema.TrainConfig`: the model to train. The base is quantized on the
      GPU this rank trains on (``trainer.accelerator`` / ``trainer.devices``), prepared for k-bit
      training, given the adapter (new, or ``lora.init_from``: then its own r / alpha / targets apply)
      and the speed paths (``speed``). Only the adapter trains. Under FSDP (the published FSDP + QLoRA
      recipe, see :mod:`lit_lora.training.strategies`) the base keeps one dtype per decoder layer: 4-bit storage
      in the compute dtype (:func:`lit_lora.models.placement.sharded_storage_dtype`; ``cfg`` is not changed),
      no float32 upcast of norms and embeddings, FSDP's activation checkpointing (:func:`checkpointing`).
    - any other config with ``model`` and ``quant`` (merge, generate, evaluate): the base, quantized as
      training did, in eval mode; with ``adapter`` (a PEFT adapter folder) attached. ``export_dtype``:
      see :func:`load_base`. ``cuda_index``: the GPU a quantized base loads on; ``"auto"``: this
      process's rank when CUDA is available, else the CPU.
    """
    if isinstance(cfg, TrainConfig):
        return _build_for_training(cfg)
    quantization = bnb_config(cfg.quant) if cfg.quant.enabled else None
    if cuda_index == "auto":
        cuda_index = local_rank() if torch.cuda.is_available() else None
    dtype = compute_dtype(cfg.model, cfg.quant)
    base, tokenizer, source, _ = load_base(
        cfg.model, dtype=dtype, quantization=quantization, cuda_index=cuda_index, export_dtype=export_dtype
    )
    if export_dtype is not None:
        dtype = base.dtype  # the stored precision load_base chose
    model, targets = base, None
    if adapter is not None:
        model = attach_adapter(base, adapter)
        targets = sorted(model.peft_config[model.active_adapter].target_modules)
    model.eval()
    return _built(model, tokenizer, source, targets, dtype, quantized=quantization is not None)


def _build_for_training(cfg: TrainConfig) -> BuiltModel:
    import dataclasses

    from peft import get_peft_model, prepare_model_for_kbit_training

    sharded = is_fsdp(cfg.trainer.strategy)
    lora_cfg = cfg.lora
    if lora_cfg.init == "loftq" and not torch.cuda.is_available():
        # PEFT's LoftQ quantizes the base with bitsandbytes on the GPU: the fix instead of a CUDA assertion.
        raise UserError("lora.init=loftq needs a CUDA device; on CPU use lora.init=pissa or default")
    if cfg.objective.ref_adapter:  # before any weight loads: a wrong folder fails in a second
        check_adapter_folder(cfg.objective.ref_adapter)
    # 1. Targets, on a weightless skeleton, when the architecture is known without a download.
    targets = check_targets_early(cfg.model, lora_cfg)
    quant_cfg = cfg.quant
    if sharded:
        quant_cfg = dataclasses.replace(quant_cfg, storage_dtype=sharded_storage_dtype(quant_cfg))
    quantization = bnb_config(quant_cfg) if quant_cfg.enabled else None  # fails early if bnb cannot
    dtype = compute_dtype(cfg.model, quant_cfg, cfg.trainer.precision)
    # bitsandbytes quantizes on load, on the GPU this process trains on (one per rank under DDP/FSDP;
    # the model is loaded before Lightning sets the device).
    cuda_index = cuda_index_for(
        cfg.trainer.accelerator, cfg.trainer.devices, local_rank(), torch.cuda.is_available()
    )
    base, tokenizer, source, config = load_base(
        cfg.model,
        dtype=dtype if quantization is not None else getattr(torch, cfg.model.dtype),
        quantization=quantization,
        cuda_index=cuda_index,
    )
    if targets is None:
        targets = resolve_targets(
            lora_cfg.target_modules, config.model_type, linear_module_paths(_skeleton(config))
        )

    # 2. k-bit preparation (norms to fp32, input grads on) and activation checkpointing.
    mechanism = checkpointing(cfg)
    gc_kwargs = {"use_reentrant": False}
    if sharded:
        base.config.use_cache = False  # FSDP: uniform dtypes, FSDP's checkpointing (see the docstring)
    elif quantization is not None:
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=mechanism == "transformers",
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    if quantization is not None:
        keep_4bit_layers_trainable_on_cpu(base)
    elif mechanism == "transformers":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        # Without this, checkpointed blocks see inputs that do not require grad and LoRA B never trains.
        base.enable_input_require_grads()

    # 3. The adapter: a new one, or an existing PEFT adapter folder to continue from (lora.init_from).
    if lora_cfg.init_from:
        model = attach_adapter(base, lora_cfg.init_from, trainable=True)
        targets = sorted(model.peft_config[model.active_adapter].target_modules)
    else:
        model = get_peft_model(base, _peft_lora_config(lora_cfg, targets))
    if cfg.objective.ref_adapter:  # DPO's reference: a second, frozen adapter on the same base
        load_reference(model, cfg.objective.ref_adapter)
    check_only_adapter_trainable(model)

    # 4. The speed paths (lit_lora.speedups); they change no parameter count.
    bf16_autocast = cfg.trainer.precision == "bf16-mixed" and quantization is None
    speedups = apply_speedups(
        model, cfg.speed, lora_dropout=lora_cfg.dropout, bf16_autocast=bf16_autocast, sharded=sharded
    )
    return _built(
        model,
        tokenizer,
        source,
        targets,
        dtype,
        quantized=quantization is not None,
        speedups=speedups,
        checkpointing=mechanism,
    )


def _built(model, tokenizer, source, targets, dtype, *, quantized, speedups=None, checkpointing="none"):
    trainable, total = count_params(model)
    return BuiltModel(
        model,
        tokenizer,
        source,
        trainable,
        total,
        targets,
        dtype,
        quantized,
        speedups or Speedups(),
        checkpointing,
    )
