"""Typed configs of the commands that follow training: merge, generate, evaluate.

They share the ``model``, ``quant`` and ``data`` groups (and their schema) with ``lit_lora.training.run``, so
the same overrides work: ``lit-lora evaluate model=... quant=nf4 data=sentiment adapters=[...]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from lit_lora.config.schema import (
    DTYPES,
    DataConfig,
    ModelConfig,
    QuantConfig,
    _one_of,
    register_configs,
    to_schema_object,
)
from lit_lora.errors import UserError


@dataclass
class MergeConfig:
    """``adapter`` folder + base -> a plain Hugging Face model folder ``output_dir`` in ``dtype``.

    The base is the checkpoint as stored, not training's ``model.dtype`` copy; ``model`` and ``quant``
    name the base and how training quantized it (see :mod:`lit_lora.apps.merge`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: str = MISSING
    output_dir: str = MISSING
    output_root: str | None = None  # output_dir must lie under it; see lit_lora/paths.py
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _one_of("merge", "dtype", self.dtype, DTYPES)


@dataclass
class GenerateConfig:
    """One ``prompt`` (or, without one, an interactive chat) with the base plus an optional ``adapter``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: str | None = None
    prompt: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int = 0
    stream: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class EvaluateConfig:
    """Perplexity and task metrics of the base and of each adapter on one split of ``data``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapters: list[str] = field(default_factory=list)
    base: bool = True  # evaluate the base model too
    split: str = "test"
    output: str | None = None  # JSON file; default <work_dir>/evaluation.json
    work_dir: str = MISSING
    output_root: str | None = None  # work_dir and output must lie under it; see lit_lora/paths.py
    generate: bool = True  # task metrics need generation; perplexity alone does not
    # Prompt rows (data.format=prompt): the reward functions that score the answers, as in training
    # (rewards.<name>._target_ ...); null: those of the first adapter's run (<run>/config.yaml).
    rewards: Any = None

    def __post_init__(self) -> None:
        _one_of("evaluate", "split", self.split, ("train", "val", "test"))


EXPORT_FORMATS = ("gguf", "gguf-lora")


@dataclass
class ExportConfig:
    """``adapter`` -> a GGUF file for llama.cpp / Ollama (``format=gguf``: merged; ``gguf-lora``: the
    adapter alone), a Modelfile and ``export.json``, checked by the parity gate (:mod:`lit_lora.export.exporter`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)  # held-out rows when the adapter has no run folder
    adapter: str = MISSING
    format: str = "gguf"
    outtype: str = "f16"
    output_dir: str | None = None  # default: <run folder>/export-<format>-<outtype>
    output_root: str | None = None  # output_dir must lie under it; see lit_lora/paths.py
    pre_tokenizer: str | None = None  # llama.cpp's pre-tokenizer name, where lit-lora cannot tell it
    base_gguf: str | None = None  # gguf-lora: the GGUF base it applies to (embedded model: its own file)
    modelfile: bool = True
    gate: bool = True
    gate_rows: int = 100  # held-out rows whose greedy answers are compared
    logit_rows: int = 8  # held-out rows whose logits are compared
    llama_cpp: bool = True  # also run llama.cpp (llama-cpp-python) in the gate when it is installed

    def __post_init__(self) -> None:
        _one_of("export", "format", self.format, EXPORT_FORMATS)
        if self.gate_rows < 1 or self.logit_rows < 1:
            raise UserError("gate_rows and logit_rows must be >= 1")


@dataclass
class ServeConfig:
    """The OpenAI-compatible server (:mod:`lit_lora.serve.server`): the base of ``model`` / ``quant`` and the
    adapters of ``adapters`` (``{name: folder}``, or a list of folders or ``name=folder`` items)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapters: Any = None  # {name: folder} or [folder, name=folder, ...]
    base_name: str = "base"  # the name the base answers to
    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 to open it
    port: int = 8000  # 0: any free port (printed at start)
    api_key: str | None = None  # conf/serve.yaml reads LIT_LORA_API_KEY; never logged
    max_new_tokens: int = 512  # a request's max_tokens default and cap
    max_batch_size: int = 16  # requests decoded together
    batch_timeout: float = 0.01  # seconds an idle server waits for more requests to batch
    grace_period_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    temperature: float = 0.0  # for requests that give none: 0 is greedy, as lit_lora.apps.generate
    log_level: str = "warning"  # uvicorn's; "debug" adds the access log

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in 0..65535, got {self.port}")
        if self.max_new_tokens < 1 or self.max_batch_size < 1:
            raise UserError("max_new_tokens and max_batch_size must be >= 1")
        if self.batch_timeout < 0 or self.grace_period_s < 0 or self.temperature < 0:
            raise UserError("batch_timeout, grace_period_s and temperature must be >= 0")
        if self.api_key is not None and not str(self.api_key).strip():
            raise UserError("api_key is empty; leave it unset to serve without one")
        _one_of("serve", "log_level", self.log_level, ("critical", "error", "warning", "info", "debug"))


def register_app_configs() -> None:
    """Register the merge / generate / evaluate schemas, and the training schema they compose with."""
    register_configs()
    store = ConfigStore.instance()
    store.store(name="merge_schema", node=MergeConfig)
    store.store(name="generate_schema", node=GenerateConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="serve_schema", node=ServeConfig)


def typed(cfg: DictConfig, kind: type):
    """``cfg`` as its schema dataclass ``kind``; bad values become a :class:`UserError`."""
    return to_schema_object(cfg, kind, f"the config does not use the {kind.__name__} schema")
