"""Which of lit-lora's CPU training paths pay: each switched off in turn, against the defaults, in one process.

``make bench`` compares whole systems, one process per run, and its ratios move by ~10 % between
invocations on a shared machine. A single path's effect is smaller than that noise, so this benchmark
builds the default model once, copies it into one model per variant (each prepared by
``lit_lora.model.prepare_for_training`` with its own config, as ``lit_lora.train`` would) and times
them on the same batches of the demo rows, one step of each in turn (order alternating), in bf16
autocast with lit-lora's trained-position loss and AdamW. Reported per variant: tokens/s and the
median over steps of (default step time / variant step time): below 1.0 the variant is slower, so
the path it switches off pays.

Variants: ``lora.fused_linear=false`` (PEFT's LoRA forward), ``lora.fast_dropout=false`` (PEFT's
``nn.Dropout``, which also turns the fused path off), ``model.eager_attention_max_len=0`` (SDPA for
short sequences), ``model.right_padding_mask=true`` (padded batches carry their attention mask),
``model.fused_rmsnorm=false`` (transformers' RMSNorm) and ``torch.compile`` of every decoder layer over
PEFT's path with ``nn.Dropout`` (the fused path's integer mask views do not compile).

Usage: python -m bench.paths [--steps 24] [--dry-run]   (writes bench/results/paths-cpu.{md,json})
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.run import machine
from bench.systems import _config

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = "lit-lora defaults"
VARIANTS = {
    DEFAULTS: {},
    "lora.fused_linear=false": {"lora": {"fused_linear": False}},
    "lora.fast_dropout=false": {"lora": {"fast_dropout": False}},
    "model.eager_attention_max_len=0": {"model": {"eager_attention_max_len": 0}},
    "model.right_padding_mask=true": {"model": {"right_padding_mask": True}},
    "model.fused_rmsnorm=false": {"model": {"fused_rmsnorm": False}},
    "torch.compile per layer (PEFT path)": {
        "lora": {"fused_linear": False, "fast_dropout": False},
        "compile": True,
    },
}


def _prepared(base_model, cfg, variant: dict):
    from lit_lora.model import prepare_for_training

    model = copy.deepcopy(base_model)
    model_cfg = dataclasses.replace(cfg.model, **variant.get("model", {}))
    lora_cfg = dataclasses.replace(cfg.lora, **variant.get("lora", {}))
    prepare_for_training(model, model_cfg, lora_cfg, bf16_mixed=True)
    if variant.get("compile"):
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, foreach=True)  # as LitLoRA on a CPU
    return model, optimizer, model_cfg.right_padding_mask


def _step(model, optimizer, right_padding_mask: bool, batch) -> None:
    from lit_lora.loss import trained_token_loss
    from lit_lora.module import LitLoRA

    with torch.autocast("cpu", dtype=torch.bfloat16):
        divisor = (batch["labels"][:, 1:] != -100).sum().float()
        inputs = LitLoRA._model_inputs(batch, False, right_padding_mask)
        loss = trained_token_loss(model, inputs, batch["labels"], divisor)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=24, help="timed steps per variant (after 2 warm-up steps)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny random model, 2 timed steps, no results file"
    )
    args = parser.parse_args()
    from lit_lora.allocator import tune_host_allocator
    from lit_lora.data import DataModule
    from lit_lora.model import build_model

    steps = 2 if args.dry_run else args.steps
    overrides = ["data.group_by_length=true", "data.batch_size=4", "data.cache=false"]
    overrides += [f"data.train_size={4 * (steps + 2)}", "data.val_size=8", "data.test_size=4"]
    cfg = _config(overrides + (["model=tiny"] if args.dry_run else []))
    tune_host_allocator()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.quant, cfg.lora)
    with tempfile.TemporaryDirectory() as scratch:
        data = DataModule(cfg.data, built.tokenizer, Path(scratch))
        data.setup()
        batches = list(data.train_dataloader())[: steps + 2]
    variants = VARIANTS if not args.dry_run else {k: v for k, v in VARIANTS.items() if not v.get("compile")}
    models = {name: _prepared(built.model, cfg, variant) for name, variant in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    tokens = 0
    for i, batch in enumerate(batches):
        order = list(models) if i % 2 else list(models)[::-1]
        for name in order:
            start = time.perf_counter()
            _step(*models[name], batch)
            if i >= 2:  # the first two steps warm up (and compile)
                times[name].append(time.perf_counter() - start)
        if i >= 2:
            tokens += int(batch["token_mask"].sum())
    rows = []
    for name, spent in times.items():
        ratios = [d / v for d, v in zip(times[DEFAULTS], spent, strict=True)]
        rows.append(
            {
                "variant": name,
                "tokens_per_s": round(tokens / sum(spent), 1),
                "speed_vs_defaults": round(statistics.median(ratios), 3),
            }
        )
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "steps": len(times[DEFAULTS]),
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    if args.dry_run:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "paths-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# lit-lora CPU paths, each switched off in turn",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Demo rows, batches of 4 (85-97 tokens),"
        f" {result['steps']} timed steps per variant, interleaved in one process (`python -m bench.paths`).",
        "",
        "| variant | tokens/s | speed vs defaults (median of per-step ratios) |",
        "|---|---|---|",
        *(f"| {r['variant']} | {r['tokens_per_s']} | {r['speed_vs_defaults']:.3f}x |" for r in rows),
        "",
    ]
    (RESULTS / "paths-cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
