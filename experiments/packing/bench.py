"""Benchmark: trained tokens per second with sequence packing vs plain dynamic padding.

Same model (embedded SmolLM2-135M, default LoRA), same examples, same batch size and ``max_seq_len``;
only packing differs. Two corpora (``--corpus``):

- ``presets``: the four application presets' training splits together (sentiment rows of ~50 tokens to
  summarization rows of ~200), ``max_seq_len`` 256;
- ``longtail``: demo-task rows whose input holds a log-normally distributed number of sentences
  (median 1 extra sentence, a tail to 20), the long-tailed length profile of typical instruction data, ``max_seq_len`` 512.
 Runs are interleaved (plain, packed, plain, packed, ...)
because these machines are shared and noisy: only figures from the same invocation are compared.
Throughput is the project's own :class:`callbacks.throughput.Throughput` measurement inside a
Lightning fit. Each run is one epoch over the same examples, so plain and packed runs train exactly
the same tokens; the headline is trained tokens / wall time of that epoch. The steady-state rate
(first two steps left out) is reported too. It also checks that packing does not change the loss over
the same examples.

Usage: python experiments/packing/bench.py [--rounds 2] [--batch-size 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from callbacks.throughput import Throughput
from lit_lora.config.schema import register_configs, to_train_config
from lit_lora.data.batching import MODEL_KEYS, collate, pack, padding_fraction
from lit_lora.data.module import DataModule
from lit_lora.data.rendering import IGNORE_INDEX
from lit_lora.models.builder import build_model
from lit_lora.training.module import LitLoRA

PRESETS = ("translation_vi_en", "summarization", "sentiment", "qa")
HERE = Path(__file__).resolve().parent


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(HERE.parents[1] / "conf"), version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=overrides))


def corpus(max_seq_len: int, scratch: Path) -> tuple[list[dict], object]:
    """Training examples of the four presets, tokenized by the project's data module, and the tokenizer."""
    cfg = _compose([f"output_dir={scratch}", "speed=off"])
    built = build_model(cfg)
    examples: list[dict] = []
    for preset in PRESETS:
        data_cfg = _compose(
            [f"data={preset}", f"output_dir={scratch}", f"data.max_seq_len={max_seq_len}"]
        ).data
        module = DataModule(data_cfg, built.tokenizer, scratch / preset)
        module.setup()
        examples += module.examples["train"]
    random.Random(0).shuffle(examples)
    return examples, built.tokenizer


def longtail_corpus(tokenizer, n: int = 160) -> list[dict]:
    """Alpaca-style demo rows with long-tailed input lengths, rendered and masked by the project's code."""
    from lit_lora.data.demo import make_rows
    from lit_lora.data.rendering import Rendering, encode_conversation

    rng = random.Random(0)
    rendering = Rendering.resolve(tokenizer)
    pool = make_rows(n * 8 + 20, seed=1, held_out_names=False)
    examples = []
    for i, row in enumerate(make_rows(n, seed=2, held_out_names=False)):
        k = min(20, int(rng.lognormvariate(0.5, 1.1)))  # extra sentences: median 1, a few near 20
        extra = " ".join(p["input"] for p in pool[i * 8 : i * 8 + k])
        user = f"{row['instruction']}\n\n{row['input']} {extra}".strip()
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        ids, labels = encode_conversation(tokenizer, rendering, messages)
        examples.append({"input_ids": ids[:512], "labels": labels[:512]})
    return examples


def one_run(examples: list[dict], tokenizer, packing: bool, args) -> dict:
    # The "mask" baseline keeps transformers' block-masked SDPA for packed rows.
    mask_baseline = packing and args.attention == "mask"
    cfg = _compose(
        ["output_dir=/tmp/unused"] + (["speed.eager_attention_max_len=null"] if mask_baseline else [])
    )
    L.seed_everything(0, verbose=False)
    built = build_model(cfg)  # the model lit_lora.training.run builds, speed paths included
    items = pack(examples, args.max_seq_len) if packing else examples
    loader = DataLoader(
        items,
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
    )
    meter = Throughput(warmup_steps=2)
    trainer = L.Trainer(
        max_epochs=1,
        precision="bf16-mixed",
        callbacks=[meter],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        module = LitLoRA(  # as lit_lora.training.run
            built.model,
            cfg.optim,
            chunked_loss=cfg.speed.chunked_loss,
            right_padding_mask=cfg.speed.right_padding_mask,
        )
        trainer.fit(module, train_dataloaders=loader)
        wall = time.perf_counter() - started
    out = meter.summary_metrics()
    return {
        "packing": packing,
        "epoch_s": round(wall, 1),
        "trained_tokens": out["trained_tokens"],
        "trained_tokens_per_s": round(out["trained_tokens"] / wall, 1),
        "steady_trained_tokens_per_s": out["trained_tokens_per_s"],
        "steady_tokens_per_s": out["tokens_per_s"],
        "padding_fraction": round(padding_fraction(items, args.batch_size), 4),
        "batches_per_epoch": len(loader),
    }


@torch.no_grad()
def loss_agreement(examples: list[dict], tokenizer, max_seq_len: int) -> dict:
    """Mean loss over the same examples, computed in padded batches and in packed rows (fp32)."""
    cfg = _compose(["output_dir=/tmp/unused", "model.dtype=float32", "speed=off"])
    model = build_model(cfg).model.eval()
    subset = examples[:48]

    def total(batches):
        loss_sum = tokens = 0.0
        for batch in batches:
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False).loss
            loss_sum += float(loss) * n
            tokens += n
        return loss_sum / tokens

    plain = total(collate(subset[i : i + 8], tokenizer.pad_token_id) for i in range(0, len(subset), 8))
    rows = pack(subset, max_seq_len)
    packed = total(collate(rows[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(rows), 4))
    return {"loss_plain": plain, "loss_packed": packed, "abs_diff": abs(plain - packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--corpus", choices=("presets", "longtail"), default="presets")
    parser.add_argument("--max-seq-len", type=int, default=None, help="256 for presets, 512 for longtail")
    parser.add_argument(
        "--attention",
        choices=("segments", "mask"),
        default="segments",
        help="packed runs: per-example segment attention (what training uses) or SDPA under a block mask",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results-<corpus>.json here")
    args = parser.parse_args()
    args.out = args.out or HERE / f"results-{args.corpus}.json"

    args.max_seq_len = args.max_seq_len or (256 if args.corpus == "presets" else 512)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        examples, tokenizer = corpus(args.max_seq_len, Path(scratch))
    if args.corpus == "longtail":
        examples = longtail_corpus(tokenizer)
    lengths = [len(e["input_ids"]) for e in examples]
    print(
        f"corpus: {len(examples)} examples, length {min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f})"
    )
    runs = []
    for r in range(args.rounds):
        for packing in (False, True):
            result = one_run(examples, tokenizer, packing, args)
            runs.append(result)
            print(f"round {r + 1} {'packed' if packing else 'plain '}: {json.dumps(result)}", flush=True)
    agreement = loss_agreement(examples, tokenizer, args.max_seq_len)
    plain = statistics.mean(r["trained_tokens_per_s"] for r in runs if not r["packing"])
    packed = statistics.mean(r["trained_tokens_per_s"] for r in runs if r["packing"])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "settings": vars(args) | {"out": str(args.out)},
        "corpus_examples": len(examples),
        "runs": runs,
        "trained_tokens_per_s_plain": round(plain, 1),
        "trained_tokens_per_s_packed": round(packed, 1),
        "speedup": round(packed / plain, 3),
        "loss_agreement": agreement,
        "wall_s": round(time.time() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"trained tokens/s: plain {plain:.1f}, packed {packed:.1f} -> {packed / plain:.2f}x; "
        f"loss plain {agreement['loss_plain']:.6f} vs packed {agreement['loss_packed']:.6f} "
        f"(diff {agreement['abs_diff']:.2e}); written {args.out}"
    )


if __name__ == "__main__":
    main()
