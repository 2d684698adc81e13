"""Which of lit-lora's CPU training paths pay: each against plain transformers + PEFT (``speed=off``) and
against the defaults, in one process.

``make bench`` compares whole systems, one process per run, and its ratios move by ~10 % between
invocations on a shared machine. A single path's effect is smaller than that noise, so this benchmark
builds the default model once with ``speed=off`` (``lit_lora.models.builder.build_model``), copies it into one
model per variant, puts that variant's speed paths on it with ``lit_lora.speedups.apply_speedups`` (the
function ``build_model`` calls) and times them on the same batches of the demo rows, one step of each
in turn (order alternating), in bf16 autocast with AdamW. Reported per variant: tokens/s and the
median over steps of (baseline step time / variant step time) against ``speed=off`` and against the
defaults: above 1.0 the variant is faster.

Variants: ``speed=off``; the defaults (every path on); the defaults with each path switched off in turn
(``speed.fused_lora_linear``, ``speed.fast_dropout`` (PEFT's ``nn.Dropout``, which also turns the
fused path off), ``speed.eager_attention_max_len=0`` (SDPA for short sequences),
``speed.right_padding_mask=true`` (padded batches carry their attention mask), ``speed.fused_rmsnorm``,
``speed.chunked_loss``, ``speed.bf16_frozen_linears``); and ``torch.compile`` of every decoder layer
over ``speed=off`` (the fused path's integer mask views do not compile). The allocator setting is
process-wide and applies to all variants alike, so it is not compared here (``make bench-packing``).

Usage: python -m bench.speed_paths [--steps 24] [--dry-run]   (writes bench/results/paths-cpu.{md,json})
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
OFF = "speed=off"
DEFAULTS = "lit-lora defaults"
VARIANTS = {
    OFF: "off",
    DEFAULTS: {},
    "speed.fused_lora_linear=false": {"fused_lora_linear": False},
    "speed.fast_dropout=false": {"fast_dropout": False},
    "speed.eager_attention_max_len=0": {"eager_attention_max_len": 0},
    "speed.right_padding_mask=true": {"right_padding_mask": True},
    "speed.fused_rmsnorm=false": {"fused_rmsnorm": False},
    "speed.fused_swiglu=false": {"fused_swiglu": False},
    "speed.chunked_loss=false": {"chunked_loss": False},
    "speed.bf16_frozen_linears=false": {"bf16_frozen_linears": False},
    "torch.compile per layer (speed=off)": "compile",
}


def _prepared(plain_model, cfg, variant):
    from lit_lora.config.schema import SpeedConfig
    from lit_lora.speedups import apply_speedups

    model = copy.deepcopy(plain_model)
    if isinstance(variant, dict):
        speed = dataclasses.replace(cfg.speed, **variant, tune_host_allocator=False)
    else:
        speed = SpeedConfig.off()
    apply_speedups(model, speed, lora_dropout=cfg.lora.dropout, bf16_autocast=True, sharded=False)
    if variant == "compile":
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, foreach=True)  # as LitLoRA on a CPU
    return model, optimizer, speed


def _step(model, optimizer, speed, batch) -> None:
    from lit_lora.data.rendering import IGNORE_INDEX
    from lit_lora.speedups.chunked_loss import trained_token_loss
    from lit_lora.training.module import LitLoRA

    with torch.autocast("cpu", dtype=torch.bfloat16):
        divisor = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()
        inputs = LitLoRA._model_inputs(batch, False, speed.right_padding_mask)
        if speed.chunked_loss:
            loss = trained_token_loss(model, inputs, batch["labels"], divisor)
        else:  # transformers' loss: full-vocabulary logits for every position
            loss = model(**inputs, labels=batch["labels"]).loss
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
    from lit_lora.config.schema import SpeedConfig
    from lit_lora.data.module import DataModule
    from lit_lora.models.builder import build_model
    from lit_lora.speedups.allocator import tune_host_allocator

    steps = 2 if args.dry_run else args.steps
    overrides = ["data.group_by_length=true", "data.batch_size=4", "data.cache=false"]
    overrides += [f"data.train_size={4 * (steps + 2)}", "data.val_size=8", "data.test_size=4"]
    cfg = _config(overrides + (["model=tiny"] if args.dry_run else []))
    tune_host_allocator()  # for every variant alike (see the docstring)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    plain = build_model(dataclasses.replace(cfg, speed=SpeedConfig.off()))
    assert not plain.speedups.on
    with tempfile.TemporaryDirectory() as scratch:
        data = DataModule(cfg.data, plain.tokenizer, Path(scratch))
        data.setup()
        batches = list(data.train_dataloader())[: steps + 2]
    variants = VARIANTS if not args.dry_run else {k: v for k, v in VARIANTS.items() if v != "compile"}
    models = {name: _prepared(plain.model, cfg, variant) for name, variant in variants.items()}
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

    def speedup(baseline: str, spent: list[float]) -> float:
        return round(statistics.median(b / v for b, v in zip(times[baseline], spent, strict=True)), 3)

    rows = [
        {
            "variant": name,
            "tokens_per_s": round(tokens / sum(spent), 1),
            "speed_vs_off": speedup(OFF, spent),
            "speed_vs_defaults": speedup(DEFAULTS, spent),
        }
        for name, spent in times.items()
    ]
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
        "# lit-lora CPU speed paths against speed=off and against the defaults",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Demo rows, batches of 4 (85-97 tokens),"
        f" {result['steps']} timed steps per variant, interleaved in one process (`python -m bench.speed_paths`).",
        "",
        "| variant | tokens/s | speed vs speed=off | speed vs defaults |",
        "|---|---|---|---|",
        *(
            f"| {r['variant']} | {r['tokens_per_s']} | {r['speed_vs_off']:.3f}x | {r['speed_vs_defaults']:.3f}x |"
            for r in rows
        ),
        "",
        "Speeds are medians of per-step time ratios (baseline / variant): above 1 the variant is faster.",
        "",
    ]
    (RESULTS / "paths-cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
