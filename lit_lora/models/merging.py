"""The merged model in memory, shared by ``lit-lora merge`` and ``lit-lora export``.

The merged model is the base as stored plus the adapter: the base loads at the precision its
checkpoint stores it in (never below the output ``dtype``), whatever ``model.dtype`` training used,
``W + scale * B @ A`` is formed in float64 with PEFT's safe merge (which refuses NaN results) and
rounded once to ``dtype`` (float32, bfloat16, float16). Its logits therefore equal those of the
stored base with the adapter attached by plain PEFT.

An adapter trained on a 4-bit base (``quant=nf4`` / ``fp4`` / ``int8``, as in training) lands on the
weights it was trained against: the layers training held quantized are quantized exactly as training
did (from ``quant.compute_dtype``) and dequantized by bitsandbytes, never re-quantized after the
merge; every other weight (embeddings, norms, the output head) is the base as stored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lit_lora.config.apps import MergeConfig
from lit_lora.config.schema import QuantConfig
from lit_lora.errors import UserError
from lit_lora.models.adapters import attach_adapter, check_adapter_folder, rendering_for, tokenizer_for
from lit_lora.models.builder import build_model


def dequantize_linear4bit(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every bitsandbytes ``Linear4bit`` by an fp32 ``nn.Linear`` holding its dequantized weight.

    Must run before the model's first forward pass: on CPU, bitsandbytes repacks 4-bit weights then.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = F.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.float()
                setattr(module, name, linear)
    # The model is a plain one now: it must save and load without any quantization config.
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _quantized_linears(model: torch.nn.Module) -> list[str]:
    """Paths of the bitsandbytes linear layers of ``model``: the layers training held quantized."""
    return [name for name, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]


def load_export_base(cfg: MergeConfig):
    """``(base, tokenizer, source)``: the base to merge into, at the precision of the checkpoint.

    Without quantization: the base as stored (:func:`lit_lora.models.builder.build_model` with ``export_dtype``).
    With it: the same, except that every layer training held quantized holds the dequantized weights
    of a quantized load made exactly as training's, i.e. the values the adapter was trained against.
    """
    stored = build_model(
        dataclasses.replace(cfg, quant=QuantConfig()), export_dtype=getattr(torch, cfg.dtype)
    )
    base, tokenizer, source = stored.model, stored.tokenizer, stored.source
    if cfg.quant.enabled:
        quantized = build_model(cfg).model
        names = _quantized_linears(quantized)
        if cfg.quant.method in ("nf4", "fp4"):
            quantized = dequantize_linear4bit(quantized)
        else:
            quantized = quantized.dequantize()
        for name in names:
            # The dequantized values are exact in the wider dtype of the stored base.
            weight = quantized.get_submodule(name).weight.detach()
            base.get_submodule(name).weight.data = weight.to(base.dtype)
        del quantized
    return base, tokenizer, source


@dataclasses.dataclass
class Merged:
    """A merged model in memory: the base as stored plus the adapter, rounded once to ``cfg.dtype``;
    the tokenizer with training's chat template, and training's rendering."""

    model: torch.nn.Module
    tokenizer: object
    rendering: object
    source: str  # the base, as the builder names it
    base_dtype: str  # the precision the base was loaded at, as stored
    adapter: Path


def merged_model(cfg: MergeConfig) -> Merged:
    """Merge ``cfg.adapter`` into its base (see the module docstring); shared by
    :mod:`lit_lora.apps.merge` and :mod:`lit_lora.export.exporter`. Raises :class:`UserError` for a folder that is not an adapter or does not fit."""
    adapter = check_adapter_folder(cfg.adapter)
    base, tokenizer, source = load_export_base(cfg)
    base_dtype = str(base.dtype).removeprefix("torch.")
    # W + scale * B @ A is formed in float64 and rounded once to the output dtype.
    base = base.to(torch.float64)
    model = attach_adapter(base, adapter)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as err:  # PEFT's safe merge found NaNs
        raise UserError(f"merging {adapter} gives non-finite weights: {err}") from err
    merged = merged.to(getattr(torch, cfg.dtype)).eval()
    tokenizer = tokenizer_for(adapter, tokenizer)
    rendering = rendering_for(adapter, tokenizer)
    tokenizer.chat_template = rendering.chat_template  # serving renders exactly as training did
    return Merged(merged, tokenizer, rendering, source, base_dtype, adapter)
