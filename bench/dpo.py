"""``make bench-dpo``: lit-lora DPO against TRL's ``DPOTrainer`` + PEFT, and lit-lora SFT for memory.

Three systems on the embedded SmolLM2-135M, each run in its own process (so that each peak resident
memory is its own), in interleaved rounds (lit, trl, sft, lit, trl, sft...) so that a shared machine's
noise hits all alike:

- ``lit``: ``lit-lora train objective=dpo data=demo_preference`` settings: the reference is the
  base with the adapter off, chosen and rejected in one forward, lit-lora's speed paths on.
- ``trl``: TRL's ``DPOTrainer`` on the same PEFT model (the adapter of lit-lora's defaults), the same
  pairs (conversational rows, so TRL renders them with the same chat template), beta, learning rate,
  batch of pairs and precision (bf16 autocast). TRL copies a pre-existing adapter as its reference; that
  copy is removed so that its reference is the base with the adapter off, as lit-lora's.
- ``sft``: lit-lora SFT on the demo task with a batch of twice as many rows (the sequences of the same
  number of pairs): the memory a DPO step is compared with.

Throughput is pairs per second over the steps after the first two (warm-up); memory is the process's
peak RSS on a CPU (peak allocated on CUDA). Writes ``bench/results/<name>.json`` and ``.md``.
Usage: python -m bench.dpo [--rounds 1] [--steps 12] [--pairs 160] [--name dpo-cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_results

SYSTEMS = ("lit", "trl", "sft")
NAMES = {"lit": "lit-lora DPO", "trl": "TRL DPOTrainer + PEFT", "sft": "lit-lora SFT (2x rows)"}
BATCH_PAIRS = 8
BETA = 0.1
LR = 5e-4
WARMUP_STEPS = 2


def _lit(system: str, steps: int, pairs: int, scratch: Path) -> dict:
    from bench.systems import _peak_memory_mb
    from lit_lora import train

    common = [
        f"output_root={scratch}",
        f"output_dir={scratch / system}",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "score=false",
        "logger=none",
        f"optim.lr={LR}",
        f"callbacks.throughput.warmup_steps={WARMUP_STEPS}",
        "~callbacks.adapter_checkpoint",
    ]
    if system == "lit":
        data = [
            "objective=dpo",
            f"objective.beta={BETA}",
            "data=demo_preference",
            f"data.batch_size={BATCH_PAIRS}",
        ]
    else:
        data = [f"data.batch_size={2 * BATCH_PAIRS}"]
    summary = train.run([*common, *data, f"data.train_size={pairs}", "data.val_size=8", "data.test_size=4"])
    return {
        "pairs_per_s": summary["samples_per_s"] if system == "lit" else None,
        "rows_per_s": summary["samples_per_s"],
        "steady_steps": steps - WARMUP_STEPS,
        "peak_memory_mb": _peak_memory_mb(),
    }


def _trl(steps: int, pairs: int, scratch: Path) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench.systems import _peak_memory_mb, quiet_trainer_args
    from lit_lora.config.schema import ModelConfig, SpeedConfig, TrainConfig
    from lit_lora.data.demo import make_pairs
    from lit_lora.models.builder import build_model

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name_or_path="embedded:smollm2-135m"), speed=SpeedConfig.off())
    built = build_model(cfg)  # SmolLM2 + the adapter of lit-lora's defaults, plain PEFT

    def conversational(row: dict) -> dict:
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }

    rows = [conversational(r) for r in make_pairs(pairs, 1234, held_out_names=False)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = DPOConfig(
        **quiet_trainer_args(scratch / "trl", BATCH_PAIRS, LR), beta=BETA, max_steps=steps, max_length=256
    )
    trainer = DPOTrainer(
        model=built.model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=built.tokenizer,
        callbacks=[Clock()],
    )
    if "ref" in built.model.peft_config:  # the reference: the base with the adapter off, as lit-lora's
        built.model.delete_adapter("ref")
        built.model.set_adapter("default")
    trainer.train()
    steady = times[WARMUP_STEPS - 1 :]
    elapsed = steady[-1] - steady[0]
    return {
        "pairs_per_s": round(BATCH_PAIRS * (len(steady) - 1) / elapsed, 2),
        "steady_steps": len(steady) - 1,
        "peak_memory_mb": _peak_memory_mb(),
    }


def run_system(system: str, steps: int, pairs: int) -> dict:
    """One system in a fresh process; its ``RESULT {json}`` line."""
    cmd = [
        sys.executable,
        "-m",
        "bench.dpo",
        "--system",
        system,
        "--steps",
        str(steps),
        "--pairs",
        str(pairs),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{system} failed:\n{done.stderr[-3000:]}")


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def markdown(report: dict) -> str:
    table = report["table"]
    lines = [
        f"# DPO benchmark ({report['date']}, {report['machine']})",
        "",
        f"{report['steps']} steps of {BATCH_PAIRS} pairs (beta {BETA}, lr {LR}, bf16 autocast), "
        f"{report['rounds']} interleaved round(s); medians.",
        "",
        "| system | pairs/s | peak memory MB |",
        "|---|---|---|",
    ]
    for system in SYSTEMS:
        row = table[system]
        lines.append(f"| {NAMES[system]} | {row['pairs_per_s'] or '-'} | {row['peak_memory_mb']} |")
    lines += ["", *[f"- {t}" for t in report["targets"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--name", default="dpo-cpu")
    args = parser.parse_args()
    if args.system:  # one system, in this process
        with tempfile.TemporaryDirectory() as scratch:
            if args.system == "trl":
                result = _trl(args.steps, args.pairs, Path(scratch))
            else:
                result = _lit(args.system, args.steps, args.pairs, Path(scratch))
        print("RESULT " + json.dumps(result), flush=True)
        return
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for round_ in range(args.rounds):
        for system in SYSTEMS:
            started = time.perf_counter()
            runs[system].append(run_system(system, args.steps, args.pairs))
            print(f"round {round_ + 1} {system}: {runs[system][-1]} ({time.perf_counter() - started:.0f} s)")
    table = {s: {k: _median(runs[s], k) for k in ("pairs_per_s", "peak_memory_mb")} for s in SYSTEMS}
    speed = table["lit"]["pairs_per_s"] / table["trl"]["pairs_per_s"]
    memory_trl = table["lit"]["peak_memory_mb"] / table["trl"]["peak_memory_mb"]
    memory_sft = table["lit"]["peak_memory_mb"] / table["sft"]["peak_memory_mb"]
    targets = [
        f"pairs/s vs TRL: {speed:.2f}x (target >= 1.5x): {'met' if speed >= 1.5 else 'NOT met'}",
        f"peak memory vs TRL: {memory_trl:.2f}x (target <= 1.0x): {'met' if memory_trl <= 1.0 else 'NOT met'}",
        f"peak memory vs SFT: {memory_sft:.2f}x (target <= 1.3x): {'met' if memory_sft <= 1.3 else 'NOT met'}",
    ]
    import platform

    import torch

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "steps": args.steps,
        "rounds": args.rounds,
        "runs": runs,
        "table": table,
        "targets": targets,
    }
    write_results(args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
