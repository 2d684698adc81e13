"""``make bench-gpu``: QLoRA on a Mistral-7B-shaped model, lit-lora vs Hugging Face ``Trainer`` + PEFT.

No network: the model is built from Mistral-7B's architecture (32 layers, hidden 4096, GQA 32/8 heads,
vocabulary 32,000) with random weights, since speed and memory do not depend on weight values. Its
linear layers are quantized to NF4 with double quantization (bitsandbytes ``Linear4bit``, bf16
compute), then both systems train LoRA r=64 on q/k/v/o with non-reentrant activation checkpointing,
sequence 2048, on the same random batches. Each system runs in a process of its own (so its peak
memory is its own), interleaved (lit, hf, lit, hf...). Targets: lit-lora peak memory <= 10 GiB and
tokens/s >= Trainer's. The model is built on the GPU without random init and quantized there (see
:func:`build`): built on the CPU, the 7B model took the whole of a 282 s device slot (H200, 2026-11-30).
Writes ``bench/results/bench-gpu-<device>.json`` (``--out`` elsewhere).

``--dry-run`` runs the same code on a 2-layer, hidden-64 Mistral on the CPU (bitsandbytes' CPU 4-bit
path) with sequence 64: it checks the script, not the machine (the tests run it so it cannot rot).

Usage: python -m bench.gpu [--rounds 2] [--steps 6] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from bench import RESULTS
from bench.run import machine

MISTRAL_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
}
TINY = {
    **MISTRAL_7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
GIB = 2**30


def _skip_init():
    """A context in which building a model allocates its tensors without initialising them (transformers'
    ``no_init_weights``: ``torch.nn.init`` and ``init_weights`` become no-ops); a no-op context where this
    transformers has none. Random init of a 7B model on the CPU took minutes; values are set after."""
    import contextlib

    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build(dry_run: bool, config_overrides: dict | None = None):
    """The NF4-quantized, LoRA-wrapped random Mistral (on the GPU unless ``dry_run``).

    Built fast: the bf16 model is allocated directly on its device without random init (uninitialised
    memory), its weights are then filled on that device (normal, std 0.02; norms 1: finite losses, values
    irrelevant to speed), and each Linear is swapped for a ``Linear4bit`` created on the meta device and
    quantized from the device tensor. Nothing of the 7B model is materialised on the CPU.
    """
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, MistralConfig

    device = "cpu" if dry_run else "cuda"
    torch.manual_seed(0)
    shape = {**(TINY if dry_run else MISTRAL_7B), **(config_overrides or {})}
    config = MistralConfig(**shape, attn_implementation="sdpa")
    with torch.device(device), _skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",  # no throw-away fp32 weight per layer
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                setattr(parent, name, q)
                # bitsandbytes quantizes Params4bit on this move (the CPU too), freeing the bf16 weight.
                q.to(device)
    model.config.use_cache = False
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(
        r=64,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), device


def batches(n: int, batch_size: int, seq_len: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (batch_size, seq_len), generator=generator)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": ids.clone(),
                "token_mask": torch.ones_like(ids),
            }
        )
    return out


def one(system: str, args) -> dict:
    from bench.systems import StepClock

    model, device = build(args.dry_run)
    data = batches(args.steps, args.batch_size, args.seq_len)
    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if system == "lit":
            import lightning as L

            from lit_lora.config.schema import OptimConfig
            from lit_lora.training.module import LitLoRA

            class Clock(L.Callback):
                def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                    clock.step(int(batch["token_mask"].sum()), int(batch["token_mask"].sum()))

            trainer = L.Trainer(
                accelerator="cpu" if args.dry_run else "gpu", devices=1, precision="bf16-mixed", max_steps=args.steps,
                callbacks=[Clock()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0,
            )  # fmt: skip
            module = LitLoRA(model, OptimConfig(lr=1e-4), chunked_loss=True)
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        else:
            from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

            class Clock(TrainerCallback):
                def on_step_end(self, targs, state, control, **kwargs):
                    clock.step(args.batch_size * args.seq_len, args.batch_size * args.seq_len)

            rows = [
                {k: v[i] for k, v in b.items() if k != "token_mask"}
                for b in data
                for i in range(args.batch_size)
            ]
            targs = TrainingArguments(
                output_dir="/tmp/bench-gpu-hf", per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=1e-4, bf16=True, use_cpu=args.dry_run, save_strategy="no", report_to=[],
                logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                gradient_checkpointing=False,  # already on, non-reentrant, from prepare_model_for_kbit_training
            )  # fmt: skip
            Trainer(
                model=model,
                args=targs,
                train_dataset=rows,
                data_collator=default_data_collator,
                callbacks=[Clock()],
            ).train()
    if torch.cuda.is_available() and not args.dry_run:
        peak = torch.cuda.max_memory_allocated() / GIB
    else:
        from lit_lora.process import process_memory_mb

        peak = process_memory_mb()["peak_rss_mb"] / 1024
    return {**clock.result(), "system": system, "peak_memory_gib": round(peak, 3), "device": device}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None, help="2048 (64 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--system", choices=("lit", "hf"), help="internal: run one system and print it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.seq_len = args.seq_len or (64 if args.dry_run else 2048)
    if args.system:
        print("RESULT " + json.dumps(one(args.system, args)), flush=True)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench-gpu: no CUDA device here; run with --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    runs = []
    for r in range(args.rounds):
        for system in ("lit", "hf"):
            cmd = [sys.executable, "-m", "bench.gpu", "--system", system, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]  # fmt: skip
            cmd += ["--dry-run"] if args.dry_run else []
            done = subprocess.run(
                cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{system} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs.append({**json.loads(line[7:]), "round": r + 1})
            print(json.dumps(runs[-1]), flush=True)
    by = {s: [x for x in runs if x["system"] == s] for s in ("lit", "hf")}
    summary = {
        s: {
            "tokens_per_s": round(sum(x["tokens_per_s"] for x in rs) / len(rs), 1),
            "peak_memory_gib": max(x["peak_memory_gib"] for x in rs),
        }
        for s, rs in by.items()
    }
    report = {
        "machine": machine(),
        "dry_run": args.dry_run,
        "settings": {"model": "tiny Mistral" if args.dry_run else "Mistral-7B shape, random", "quant": "nf4+dq",
                     "lora_r": 64, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps},
        "summary": summary,
        "targets": {
            "lit_peak_memory_le_10_gib": summary["lit"]["peak_memory_gib"] <= 10,
            "lit_tokens_per_s_ge_trainer": summary["lit"]["tokens_per_s"] >= summary["hf"]["tokens_per_s"],
        },
        "runs": runs,
        "wall_s": round(time.time() - started, 1),
    }  # fmt: skip
    out = args.out or (
        None
        if args.dry_run
        else RESULTS / f"bench-gpu-{torch.cuda.get_device_name(0).replace(' ', '_')}.json"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "targets": report["targets"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
