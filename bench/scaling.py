"""Scaling table: lit-lora's step time and peak memory against sequence length, LoRA rank and batch size.

Each point is one :mod:`bench.systems` run of lit-lora on fixed-length random batches in a process of its
own (its peak memory is its own): sequence length 256-2048 at batch 1, rank 8-256 at 4 x 256, batch
1-8 at sequence 256. Step time is the steady-state mean (first step left out). One run per point:
the curves show how cost grows, not differences of a few percent (this machine is shared and noisy).

Writes ``bench/results/scaling-<name>.json`` and three PNGs. Usage: python -m bench.scaling [--name cpu]
"""

from __future__ import annotations

import argparse
import json
import time

from bench import RESULTS
from bench.run import machine, run_system

SWEEPS = {
    "seq_len": {"values": [256, 512, 1024, 2048], "fixed": {"batch_size": 1, "rank": None}},
    "rank": {"values": [8, 32, 128, 256], "fixed": {"batch_size": 4, "seq_len": 256}},
    "batch_size": {"values": [1, 2, 4, 8], "fixed": {"seq_len": 256, "rank": None}},
}


def point(knob: str, value: int, fixed: dict, steps: int) -> dict:
    settings = {"seq_len": 256, "batch_size": 1, "rank": None, **fixed, knob: value}
    extra = [
        "--steps",
        str(steps),
        "--seq-len",
        str(settings["seq_len"]),
        "--batch-size",
        str(settings["batch_size"]),
    ]
    if settings["rank"]:
        extra += ["--rank", str(settings["rank"])]
    result = run_system("lit", "fixed", extra)
    tokens = settings["seq_len"] * settings["batch_size"]
    return {
        **settings,
        "step_s": round(tokens / result["tokens_per_s"], 3),
        "tokens_per_s": result["tokens_per_s"],
        "peak_memory_mb": result["peak_memory_mb"],
        "memory_kind": result["memory_kind"],
        "adapter_bytes": result["adapter_bytes"],
    }


def plot(table: dict, name: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "seq_len": "sequence length (batch 1)",
        "rank": "LoRA rank (batch 4 x 256)",
        "batch_size": "batch size (x 256 tokens)",
    }
    files = []
    for knob, points in table.items():
        xs = [p[knob] for p in points]
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        left.plot(xs, [p["step_s"] for p in points], marker="o")
        left.set_ylabel("step time (s)")
        right.plot(xs, [p["peak_memory_mb"] for p in points], marker="o", color="tab:orange")
        right.set_ylabel(f"peak memory (MiB, {points[0]['memory_kind']})")
        for axis in (left, right):
            axis.set_xlabel(labels[knob])
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.grid(alpha=0.3)
        fig.suptitle(f"lit-lora, SmolLM2-135M: cost vs {knob} ({name})")
        fig.tight_layout()
        path = RESULTS / f"scaling-{name}-{knob}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    started = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = {}
    for knob, sweep in SWEEPS.items():
        table[knob] = []
        for value in sweep["values"]:
            table[knob].append(point(knob, value, sweep["fixed"], args.steps))
            print(f"{knob}={value}: {json.dumps(table[knob][-1])}", flush=True)
    files = plot(table, args.name)
    report = {"machine": machine(), "table": table, "plots": files, "wall_s": round(time.time() - started, 1)}
    (RESULTS / f"scaling-{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {', '.join(files)} and scaling-{args.name}.json in {RESULTS}")


if __name__ == "__main__":
    main()
