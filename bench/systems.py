"""One benchmark run of one system, in a process of its own (so that its peak resident memory is its own).

Systems, all on the embedded SmolLM2-135M with the same LoRA (lit-lora's defaults: r=8, alpha=16, q/k/v/o,
dropout 0.05), AdamW at the same learning rate, bf16 autocast, the same batches; lit-lora and ``Trainer``
clip gradients at norm 1.0 (both defaults), the raw loop does not:

- ``lit``: lit-lora's training stack: ``build_model`` + ``LitLoRA`` in ``lightning.Trainer`` with
  lit-lora's defaults (chunked trained-position loss) and, on variable data, the project's data module
  with length-grouped batches (``--lit-batching packed``: packing with segment attention);
- ``hf``: Hugging Face ``Trainer`` + PEFT, as a user would write it (``DataCollatorForSeq2Seq`` dynamic
  padding on variable data, the default collator on fixed batches);
- ``raw``: a minimal PyTorch loop over the same PEFT model and the same batches as ``hf`` (forward,
  backward, ``AdamW.step``): the floor for framework overhead.

Data (``--data``): ``fixed``: random token ids, ``--batch-size`` x ``--seq-len``, every position trained;
``variable``: the demo task's training rows (85-97 tokens: real rows, but of nearly one length);
``mix``: the training rows of the four application presets (translation, summarization, sentiment, QA:
46-211 tokens), shuffled together, the length spread of a multi-task instruction mix. Rows are rendered
and masked by lit-lora; one epoch over the same examples for every system.

Prints one JSON line: tokens/s and trained tokens/s (steady state: from the end of the first optimizer
step to the end), time to first step (from process start, imports and model load included), peak
resident memory (``VmHWM``; peak CUDA memory on a GPU), adapter size.

Usage: python -m bench.systems --system lit --data fixed [--steps 8 --batch-size 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

STARTED = time.perf_counter()

import torch  # noqa: E402

from lit_lora.data.rendering import IGNORE_INDEX  # noqa: E402

LR = 2e-4


class StepClock:
    """Times optimizer steps and counts their tokens; the first step is kept apart (warm-up)."""

    def __init__(self):
        self.first_step_s: float | None = None
        self.t0: float | None = None
        self.tokens = self.trained = 0
        self.steps = 0
        self.end: float | None = None

    def step(self, tokens: int, trained: int) -> None:
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - STARTED
            self.t0 = now
        else:
            self.tokens += tokens
            self.trained += trained
            self.steps += 1
            self.end = now

    def result(self) -> dict:
        elapsed = (self.end or self.t0) - self.t0
        return {
            "time_to_first_step_s": round(self.first_step_s, 2),
            "steady_steps": self.steps,
            "tokens_per_s": round(self.tokens / elapsed, 1) if elapsed else None,
            "trained_tokens_per_s": round(self.trained / elapsed, 1) if elapsed else None,
        }


def _trained(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lit_lora.config.schema import register_configs, to_train_config

    register_configs()
    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=["output_dir=/tmp/unused", *overrides]))


def fixed_batches(n: int, batch_size: int, seq_len: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def variable_examples(tokenizer, scratch: Path, n: int) -> list[dict]:
    """The demo task's first ``n`` training examples, rendered and masked by lit-lora."""
    from lit_lora.data.module import DataModule

    cfg = _config([f"data.train_size={n}", "data.val_size=8", "data.test_size=4", "data.cache=false"])
    module = DataModule(cfg.data, tokenizer, scratch)
    module.setup()
    return module.examples["train"]


MIX_PRESETS = ("translation_vi_en", "summarization", "sentiment", "qa")


def mix_examples(tokenizer, scratch: Path, n: int) -> list[dict]:
    """The four application presets' training examples, shuffled together (seed 0), at most ``n``."""
    import random

    from lit_lora.data.module import DataModule

    examples: list[dict] = []
    for preset in MIX_PRESETS:
        cfg = _config([f"data={preset}", "data.cache=false"])
        module = DataModule(cfg.data, tokenizer, scratch / preset)
        module.setup()
        examples += module.examples["train"]
    random.Random(0).shuffle(examples)
    return examples[:n]


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    from lit_lora.process import process_memory_mb

    return process_memory_mb()["peak_rss_mb"]


def quiet_trainer_args(output_dir: Path, batch_size: int, lr: float) -> dict:
    """What every benchmark gives a Hugging Face ``TrainingArguments`` (or a TRL config built on it): bf16
    autocast, the CPU unless CUDA is there, no checkpoints, no logging, no progress bar, seed 0."""
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": batch_size,
        "learning_rate": lr,
        "bf16": True,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "report_to": [],
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }


def _adapter_bytes(model, scratch: Path) -> int:
    model.save_pretrained(scratch / "adapter", safe_serialization=True)
    return (scratch / "adapter" / "adapter_model.safetensors").stat().st_size


def _peft_model(overrides: list[str]):
    """The config and the model ``lit_lora.training.run`` would build for it (``speed=off`` in ``overrides``:
    plain transformers + PEFT, what the ``hf`` and ``raw`` systems get)."""
    from lit_lora.models.builder import build_model

    cfg = _config(overrides)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def run_lit(args, scratch: Path) -> dict:
    import lightning as L

    from lit_lora.data.module import DataModule
    from lit_lora.training.module import LitLoRA

    overrides = [f"speed.chunked_loss={str(not args.no_chunked_loss).lower()}"]
    if args.data != "fixed":
        grouping = "data.packing=true" if args.lit_batching == "packed" else "data.group_by_length=true"
        overrides += [grouping, f"data.train_size={args.examples}", "data.val_size=8"]
        overrides += ["data.test_size=4", "data.cache=false", f"data.batch_size={args.batch_size}"]
    if args.rank:
        overrides += [f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}"]
    cfg, built = _peft_model(overrides)
    clock = StepClock()

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step(int(batch["token_mask"].sum()), _trained(batch["labels"]))

    module = LitLoRA(
        built.model,
        cfg.optim,
        chunked_loss=cfg.speed.chunked_loss,
        right_padding_mask=cfg.speed.right_padding_mask,
    )
    module.optim_cfg.lr = LR
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision="bf16-mixed",
        # lit-lora's default clipping (trainer.gradient_clip_val=1.0), as Trainer's max_grad_norm=1.0
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        max_epochs=1,
        max_steps=-1 if args.data != "fixed" else args.steps,
        callbacks=[Clock()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.data == "fixed":
            batches = fixed_batches(args.steps, args.batch_size, args.seq_len, built.tokenizer.vocab_size)
            for b in batches:
                b["token_mask"] = b["attention_mask"]
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        else:
            if args.data == "mix":
                mix = mix_examples(built.tokenizer, scratch / "mix", args.examples)
                data = DataModule.from_examples(cfg.data, built.tokenizer, {"train": mix})
            else:
                data = DataModule(cfg.data, built.tokenizer, scratch / "data")
                data.setup()
            trainer.fit(module, datamodule=data)
    return {
        **clock.result(),
        "adapter_bytes": _adapter_bytes(built.model, scratch),
        "speedups_on": built.speedups.on,  # lit-lora's paths: on for lit, off (plain PEFT) for hf and raw
    }


def _hf_inputs(args, tokenizer, scratch: Path) -> list[dict]:
    if args.data == "fixed":
        return [
            {k: v[i] for k, v in b.items()}
            for b in fixed_batches(args.steps, args.batch_size, args.seq_len, tokenizer.vocab_size)
            for i in range(args.batch_size)
        ]
    if args.data == "mix":
        return mix_examples(tokenizer, scratch / "mix", args.examples)
    return variable_examples(tokenizer, scratch / "data", args.examples)


def _collator(args, tokenizer):
    from transformers import DataCollatorForSeq2Seq, default_data_collator

    if args.data == "fixed":
        return default_data_collator
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    return lambda rows: pad([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])


def run_hf(args, scratch: Path) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    overrides = [f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}"] if args.rank else []
    _, built = _peft_model([*overrides, "speed=off"])  # plain transformers + PEFT
    rows = _hf_inputs(args, built.tokenizer, scratch)
    collate = _collator(args, built.tokenizer)
    clock = StepClock()
    sizes: list[tuple[int, int]] = []

    def counting(rows_):
        batch = collate(rows_)
        sizes.append((int(batch["attention_mask"].sum()), _trained(batch["labels"])))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            clock.step(*sizes[state.global_step - 1])

    targs = TrainingArguments(
        **quiet_trainer_args(scratch / "hf", args.batch_size, LR),
        num_train_epochs=1,
        max_steps=args.steps if args.data == "fixed" else -1,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=built.model, args=targs, train_dataset=rows, data_collator=counting, callbacks=[Clock()]
        )
        trainer.train()
    return {
        **clock.result(),
        "adapter_bytes": _adapter_bytes(built.model, scratch),
        "speedups_on": built.speedups.on,  # lit-lora's paths: on for lit, off (plain PEFT) for hf and raw
    }


def run_raw(args, scratch: Path) -> dict:
    overrides = [f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}"] if args.rank else []
    _, built = _peft_model([*overrides, "speed=off"])  # plain transformers + PEFT
    model = built.model
    model.train()
    rows = _hf_inputs(args, built.tokenizer, scratch)
    collate = _collator(args, built.tokenizer)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    if args.data == "fixed":
        order = list(range(len(rows)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    clock = StepClock()
    for start in range(0, len(order), args.batch_size):
        batch = collate([rows[i] for i in order[start : start + args.batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step(int(batch["attention_mask"].sum()), _trained(batch["labels"]))
    return {
        **clock.result(),
        "adapter_bytes": _adapter_bytes(model, scratch),
        "speedups_on": built.speedups.on,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("lit", "hf", "raw"), required=True)
    parser.add_argument("--data", choices=("fixed", "variable", "mix"), default="fixed")
    parser.add_argument(
        "--steps", type=int, default=8, help="fixed data: optimizer steps (the first is warm-up)"
    )
    parser.add_argument(
        "--examples", type=int, default=160, help="variable / mix data: examples in the epoch (at most)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: lit-lora's)")
    parser.add_argument(
        "--lit-batching",
        choices=("grouped", "packed"),
        default="grouped",
        help="lit on variable data: length-grouped batches (same batch size) or packed rows",
    )
    parser.add_argument("--no-chunked-loss", action="store_true", help="lit: transformers' loss instead")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as scratch:
        result = {"lit": run_lit, "hf": run_hf, "raw": run_raw}[args.system](args, Path(scratch))
    result.update(
        system=args.system,
        data=args.data,
        batch_size=args.batch_size,
        seq_len=args.seq_len if args.data == "fixed" else None,
        rank=args.rank,
        peak_memory_mb=_peak_memory_mb(),
        memory_kind="cuda_max_allocated" if torch.cuda.is_available() else "peak_rss",
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
