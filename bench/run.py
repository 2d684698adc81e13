"""``make bench``: lit-lora vs Hugging Face ``Trainer`` + PEFT vs a raw PyTorch loop, interleaved.

Each run is a separate process (:mod:`bench.systems`), so that each system's peak resident memory is
its own; runs alternate lit, hf, raw, lit, hf, raw... so that the noise of a shared machine hits all
three alike. Three workloads: ``fixed`` (random tokens, every position trained), ``variable`` (the
demo task's rows, 85-97 tokens: real but nearly one length) and ``mix`` (the four application presets'
rows together, 46-211 tokens); on the last two lit-lora batches with its length-grouped sampler, the
others pad each batch to its longest row. Also measures the storage cost of ``quant=nf4`` in bits per quantized parameter,
from the loaded model's own tensors.

Writes ``bench/results/<name>.json`` and ``.md`` (table, ratios against ``Trainer``, targets met or not,
machine). Usage: python -m bench.run [--rounds 2] [--name cpu] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import cpu_name, write_results

SYSTEMS = ("lit", "hf", "raw")
NAMES = {"lit": "lit-lora", "hf": "HF Trainer + PEFT", "raw": "raw PyTorch + PEFT"}
WORKLOADS = {
    "fixed": "fixed: random tokens, every position trained",
    "variable": "variable: the demo task's rows (85-97 tokens, nearly one length)",
    "mix": "mix: the four application presets' rows together (46-211 tokens)",
}


def machine() -> str:
    """CPU model, cores, GPU if any, library versions: what the figures were measured on."""
    cpu = cpu_name()
    import lightning
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} threads, {gpu}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, lightning {lightning.__version__}"
    )


def run_system(system: str, data: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.systems", "--system", system, "--data", data, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def nf4_bits_per_param() -> dict:
    """Bits of storage per quantized weight of SmolLM2-135M under ``quant=nf4`` (double quantization).

    Counts, for every bitsandbytes ``Linear4bit``, the packed weight bytes and every tensor of its
    quantization state (absmax, nested absmax, code books, offsets), over its ``in x out`` weights.
    """
    from bitsandbytes.nn import Linear4bit

    from lit_lora.config.schema import ModelConfig, QuantConfig
    from lit_lora.models.builder import BaseConfig, build_model

    base = BaseConfig(ModelConfig(name_or_path="embedded:smollm2-135m"), QuantConfig(method="nf4"))
    model = build_model(base).model
    params = bits = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            params += module.in_features * module.out_features
            bits += module.weight.numel() * module.weight.element_size() * 8
            state = module.weight.quant_state
            for holder in (state, getattr(state, "state2", None)):
                if holder is None:
                    continue
                for name in ("absmax", "code", "offset"):
                    value = getattr(holder, name, None)
                    if isinstance(value, torch.Tensor):
                        bits += value.numel() * value.element_size() * 8
    return {"quantized_params": params, "bits_per_param": round(bits / params, 4)}


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for key in ("tokens_per_s", "trained_tokens_per_s", "time_to_first_step_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.mean(values), 2) if values else None
    out["peak_memory_mb"] = max(r["peak_memory_mb"] for r in runs)
    out["adapter_bytes"] = runs[0]["adapter_bytes"]
    out["speedups_on"] = runs[0].get("speedups_on")  # lit-lora's speed paths (only lit-lora has them)
    out["rounds"] = len(runs)
    return out


def targets(table: dict, nf4: dict, gpu: bool) -> list[dict]:
    fixed = table["fixed"]

    def ratio(data, a, b, key):
        return round(data[a][key] / data[b][key], 3)

    def per_data(label: str, key: str, op: str, bound: float) -> list[tuple]:
        """The check of ``label`` on each variable-length data set the run has."""
        return [
            (f"{data}: lit-lora / Trainer {label}", ratio(table[data], "lit", "hf", key), op, bound)
            for data in ("variable", "mix")
            if data in table
        ]

    checks = [
        ("fixed: lit-lora / Trainer tokens/s", ratio(fixed, "lit", "hf", "tokens_per_s"), ">=", 1.0),
        ("fixed: lit-lora / raw loop tokens/s", ratio(fixed, "lit", "raw", "tokens_per_s"), ">=", 0.95),
        *per_data("trained tokens/s", "trained_tokens_per_s", ">=", 1.5),
        ("fixed: lit-lora / Trainer peak memory", ratio(fixed, "lit", "hf", "peak_memory_mb"), "<=", 1.0),
        *per_data("peak memory", "peak_memory_mb", "<=", 1.0),
        ("nf4: bits per quantized parameter", nf4.get("bits_per_param"), "<=", 4.2),
    ]
    out = []
    for name, value, op, bound in checks:
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": value, "bound": f"{op} {bound}", "met": met})
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# lit-lora benchmark: {report['name']}",
        "",
        f"Machine: {report['machine']}. Date: {report['date']}. Rounds: {report['rounds']} (interleaved).",
        f"Settings: {json.dumps(report['settings'])}",
        "",
    ]
    for data, rows in report["table"].items():
        lines += [
            f"## {WORKLOADS.get(data, data)}",
            "",
            "| system | tokens/s | trained tokens/s | peak memory (MiB) | time to first step (s) | adapter (bytes) | tokens/s vs Trainer | trained tokens/s vs Trainer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        hf = rows["hf"]
        for system in SYSTEMS:
            r = rows[system]
            lines.append(
                f"| {NAMES[system]} | {r['tokens_per_s']} | {r['trained_tokens_per_s']} | {r['peak_memory_mb']} | "
                f"{r['time_to_first_step_s']} | {r['adapter_bytes']} | {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
                f"{r['trained_tokens_per_s'] / hf['trained_tokens_per_s']:.2f}x |"
            )
        lines.append("")
    nf4 = report["nf4"]
    lines += [
        "## nf4 storage",
        "",
        f"{nf4.get('bits_per_param')} bits per quantized parameter over {nf4.get('quantized_params')} parameters "
        "(packed 4-bit weights + absmax, double-quantized absmax and code books).",
        "",
        "## Targets",
        "",
        "| target | value | bound | met |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {t['bound']} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "Every run, in order, is in the JSON file next to this one.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (tests), not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.seq_len, args.examples, args.batch_size = 1, 3, 32, 12, 2
    started = time.time()
    common = ["--batch-size", str(args.batch_size)]
    workloads = {
        "fixed": [*common, "--steps", str(args.steps), "--seq-len", str(args.seq_len)],
        "variable": [*common, "--examples", str(args.examples)],
        "mix": [*common, "--examples", str(args.examples)],
    }
    runs: list[dict] = []
    for data, extra in workloads.items():
        for r in range(args.rounds):
            for system in SYSTEMS:
                result = run_system(system, data, extra)
                runs.append({**result, "round": r + 1})
                print(f"{data} round {r + 1} {NAMES[system]}: {json.dumps(result)}", flush=True)
    table = {
        data: {s: aggregate([x for x in runs if x["data"] == data and x["system"] == s]) for s in SYSTEMS}
        for data in workloads
    }
    nf4 = nf4_bits_per_param()
    report = {
        "name": args.name,
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "rounds": args.rounds,
        "settings": {k: v for k, v in vars(args).items() if k != "name"},
        "table": table,
        "nf4": nf4,
        "targets": targets(table, nf4, torch.cuda.is_available()),
        "runs": runs,
        "wall_s": round(time.time() - started, 1),
    }
    write_results(args.name, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
