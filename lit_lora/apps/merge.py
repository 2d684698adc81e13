"""Merge an adapter into its base: ``lit-lora merge adapter=<folder> output_dir=<new folder>``.

The output is a plain Hugging Face model folder (``save_pretrained``: safetensors weights under
transformers' own tensor names, config, tokenizer whose chat template is the one used in training,
and ``rendering.json``) that loads with ``AutoModelForCausalLM.from_pretrained`` and nothing else.

What the merged weights are (the base as stored, training's quantization undone exactly, the sum
formed in float64 and rounded once to ``dtype``) is :mod:`lit_lora.models.merging`'s contract.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from lit_lora.config.apps import MergeConfig, typed
from lit_lora.config.compose import compose
from lit_lora.errors import UserError
from lit_lora.models.adapters import check_adapter_folder
from lit_lora.models.merging import merged_model
from lit_lora.paths import confined
from lit_lora.staging import staged_folder


def merge(cfg: MergeConfig) -> Path:
    """Write the merged model folder; returns its path. Refuses an existing, non-empty ``output_dir``."""
    check_adapter_folder(cfg.adapter)
    out = confined("output_dir", cfg.output_dir, cfg.output_root)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; lit-lora never overwrites it")
    done = merged_model(cfg)

    # Complete or absent: written into a hidden folder beside it, renamed into place (lit_lora.staging).
    with staged_folder(out, mode=0o755) as tmp:
        done.model.save_pretrained(tmp, safe_serialization=True)
        done.tokenizer.save_pretrained(tmp)
        done.rendering.save(tmp)
        info = {
            "adapter": str(done.adapter.resolve()),
            "base": done.source,
            "base_dtype": done.base_dtype,
            "quant": cfg.quant.method,
            "dtype": cfg.dtype,
        }
        (tmp / "lit_lora_merge.json").write_text(json.dumps(info, indent=2))
    print(
        f"lit-lora: merged {done.adapter} into {done.source} (stored {done.base_dtype}) as {cfg.dtype} -> {out}",
        flush=True,
    )
    return out


def run(overrides: Sequence[str] = ()) -> Path:
    """``lit-lora merge <overrides>`` as a function (:mod:`lit_lora.config.compose`); returns the merged
    folder. Raises :class:`~lit_lora.errors.UserError` for user mistakes."""
    return merge(typed(compose("merge", overrides), MergeConfig))


def task(cfg: DictConfig) -> None:
    """``lit-lora merge``'s job on the composed config (:mod:`lit_lora.cli`)."""
    merge(typed(cfg, MergeConfig))
