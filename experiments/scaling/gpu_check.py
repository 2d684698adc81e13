"""GPU check of the scaling paths: DDP and FSDP + QLoRA on every visible GPU, through the real CLI.

Runs ``python -m lit_lora.train`` twice on the embedded SmolLM2-135M (nothing downloaded): ``trainer=ddp``
and ``trainer=fsdp quant=nf4 model.gradient_checkpointing=true`` (FSDP with world size 1 works on a
single GPU), then prints, from each run's ``summary.json``, peak CUDA memory per rank and tokens/s.
Exits 2 with a message on a machine without CUDA.

Usage: python experiments/scaling/gpu_check.py [--steps 30] [--out results-gpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUNS = {
    "ddp": ["trainer=ddp"],
    "fsdp_qlora": ["trainer=fsdp", "quant=nf4", "model.gradient_checkpointing=true"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; this check needs one", file=sys.stderr)
        return 2
    devices = torch.cuda.device_count()
    report = {"gpu": torch.cuda.get_device_name(0), "devices": devices, "runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in RUNS.items():
            run = Path(scratch) / name
            cmd = [
                sys.executable, "-m", "lit_lora.train", *overrides, f"trainer.devices={devices}",
                f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000", "score=false",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={run}",
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                report["runs"][name] = {"error": done.stderr[-2000:]}
                print(f"{name}: FAILED\n{done.stderr[-2000:]}")
                continue
            summary = json.loads((run / "summary.json").read_text())
            memory = summary.get("memory", {})
            per_rank = memory.get("per_rank") or [memory]
            result = {
                "tokens_per_s": summary.get("tokens_per_s"),
                "peak_allocated_mb_per_rank": [r.get("peak_allocated_mb") for r in per_rank],
                "final_train_loss": summary.get("final_train_loss"),
            }
            report["runs"][name] = result
            print(f"{name}: {json.dumps(result)}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
