"""``make bench-grpo``: lit-lora GRPO against TRL's ``GRPOTrainer`` + PEFT (its ``model.generate`` path).

Two systems on the embedded SmolLM2-135M, each run in its own process (so that each peak resident memory
is its own), in interleaved rounds (lit, trl, lit, trl...) so that a shared machine's noise hits both:

- ``lit``: ``lit-lora train objective=grpo data=demo_prompt``: rollouts decoded on the training weights
  (:mod:`lit_lora.inference.rollouts`), lit-lora's speed paths on, bf16-mixed autocast.
- ``trl``: TRL's ``GRPOTrainer`` on the same PEFT model (the adapter of lit-lora's defaults: LoRA r 8,
  alpha 16, dropout 0.05 on q/k/v/o), the same prompts (conversational rows, so TRL renders them with the
  same chat template), the same reward (``exact_match`` + 0.5 x ``fields_matched``, lit-lora's functions,
  which have TRL's signature), G, completion length, temperature, batch of completions, loss (dapo,
  beta 0, one iteration), learning rate and precision (``bf16=True``: bf16 autocast on the CPU).

Throughput is prompts per second, rollouts and updates together, over the optimizer steps after the
warm-up ones; each step's time is split by the bench's own clocks, wrapped around each system's methods
in its process:

- ``rollout``: decoding the completions (lit-lora: ``GRPOStep.seconds["rollout"]``, its rollout
  engine; TRL: ``GRPOTrainer._generate``);
- ``logps``: every log-prob forward, without gradients (old policy, reference: none with beta 0 and one
  iteration) and the policy's with gradients in the loss (lit-lora: ``GRPOStep._logps``; TRL:
  ``_get_per_token_logps_and_entropies``);
- ``update``: the rest of the step: rewards and advantages, the loss, backward, the optimizer step.

Memory is the process's peak RSS on a CPU (its whole life: lit-lora restarts the kernel's high-water
mark when a run starts, so the peak before that is kept too; the parent's ``wait4`` figure is recorded
as well), peak allocated on CUDA. Writes ``bench/results/<name>.json`` and ``.md``.
Usage: python -m bench.grpo [--repeats 1] [--steps 8] [--warmup 2] [--name grpo-cpu] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import cpu_name, write_results

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("lit", "trl")
NAMES = {"lit": "lit-lora GRPO", "trl": "TRL GRPOTrainer + PEFT"}
LR = 5e-4
TEMPERATURE = 0.7
DATA_SEED = 1234  # DataConfig.seed: the prompts of lit-lora's demo_prompt training split
SETTINGS = {  # the measurement
    "num_generations": 4,
    "max_completion_length": 48,
    "batch_completions": 16,  # per optimizer step: 4 prompts x 4 completions
    "prompts": 64,
    "steps": 8,
    "warmup": 2,
}
DRY_RUN = {  # a smoke test of the harness (tests), not a measurement: one step of each, tiny
    "num_generations": 2,
    "max_completion_length": 8,
    "batch_completions": 4,
    "prompts": 8,
    "steps": 1,
    "warmup": 0,
}
PHASES = ("rollout", "logps_no_grad", "logps_grad")


# ------------------------------------------------------------------------------------------ clocks
class Clock:
    """Cumulative seconds per phase (method wrappers) and a mark at the start of training and at the
    end of each optimizer step: ``(time, phase seconds so far, completion tokens so far)``."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.completion_tokens = 0
        self.marks: list[tuple[float, dict, int]] = []
        self.cpu: list[float] = []  # this process's CPU seconds at each mark
        self.peak_mb: list[float] = []  # this process's peak RSS (CUDA: peak allocated) at each mark

    def mark(self, seconds: dict | None = None) -> None:
        now = dict(self.seconds, **(seconds or {}))
        self.marks.append((time.perf_counter(), now, self.completion_tokens))
        self.cpu.append(time.process_time())
        self.peak_mb.append(_peak_rss_mb())

    def time_logps(self, obj, name: str) -> None:
        """Wrap ``obj.name`` (a log-prob forward): its seconds go to ``logps_grad`` or ``logps_no_grad``."""
        import torch

        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            grad = torch.is_grad_enabled()
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds["logps_grad" if grad else "logps_no_grad"] += time.perf_counter() - started

        setattr(obj, name, timed)

    def steady(self, warmup: int, prompts_per_step: int, completions_per_step: int) -> dict:
        """Throughput and the per-step time split over the steps after ``warmup`` (marks[0] is the start
        of training, so ``warmup=0`` times every step)."""
        (t0, s0, c0), (t1, s1, c1) = self.marks[warmup], self.marks[-1]
        steps = len(self.marks) - 1 - warmup
        if steps < 1:
            raise RuntimeError(f"no step after the {warmup} warm-up step(s): {len(self.marks) - 1} ran")
        elapsed = t1 - t0
        per_step = {k: (s1[k] - s0[k]) / steps for k in PHASES}
        step_s = elapsed / steps
        logps = per_step["logps_no_grad"] + per_step["logps_grad"]
        split = {
            "rollout_s": per_step["rollout"],
            "logps_s": logps,
            "update_s": step_s - per_step["rollout"] - logps,
        }
        tokens = (c1 - c0) / steps
        times = [m[0] for m in self.marks[warmup:]]
        return {
            "prompts_per_s": round(prompts_per_step * steps / elapsed, 4),
            "completions_per_s": round(completions_per_step * steps / elapsed, 3),
            "step_s": round(step_s, 3),
            "split_s": {k: round(v, 3) for k, v in split.items()},
            "split_share": {k.removesuffix("_s"): round(v / step_s, 3) for k, v in split.items()},
            "logps_detail_s": {k: round(per_step[k], 3) for k in ("logps_no_grad", "logps_grad")},
            "completion_tokens_per_step": round(tokens, 1),
            "rollout_tokens_per_s": round(tokens / per_step["rollout"], 1) if per_step["rollout"] else None,
            "steady_steps": steps,
            "step_times_s": [round(b - a, 3) for a, b in itertools.pairwise(times)],
            # CPU seconds per wall second of the steady steps: about torch's thread count on a quiet
            # machine, lower where other processes took the cores
            "cpu_per_wall": round((self.cpu[-1] - self.cpu[warmup]) / elapsed, 2),
            # where the peak is reached: at the start of training, then after each step
            "peak_mb_by_step": self.peak_mb,
        }


try:  # the lit-lora clock is a Lightning callback, named in the run's config (callbacks.bench_clock)
    import lightning as _L

    class LitClock(_L.Callback):
        """Marks lit-lora's steps; rollout seconds are the module's own ``GRPOStep.seconds``."""

        last: LitClock | None = None

        def __init__(self) -> None:
            self.clock = Clock()
            type(self).last = self

        def on_train_start(self, trainer, pl_module) -> None:
            grpo = pl_module.grpo
            self.clock.time_logps(grpo, "_logps")
            self.clock.mark({"rollout": grpo.seconds["rollout"]})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            grpo = pl_module.grpo
            if (batch_idx + 1) % trainer.accumulate_grad_batches:
                return
            if grpo.round is not None:
                self.clock.completion_tokens += sum(len(c) for c in grpo.round.completions)
            self.clock.mark({"rollout": grpo.seconds["rollout"]})

except ImportError:  # pragma: no cover - lightning is a dependency of lit-lora
    LitClock = None


# ------------------------------------------------------------------------------------------ systems
def _peak_rss_mb() -> float:
    from bench.systems import _peak_memory_mb

    return _peak_memory_mb()


def _lit(s: dict, scratch: Path) -> dict:
    from bench import grpo as this  # the module Hydra imports for callbacks.bench_clock (not __main__)
    from lit_lora import train

    before = _peak_rss_mb()  # lit-lora restarts the high-water mark when the run starts: keep this one
    overrides = [
        f"output_root={scratch}",
        f"output_dir={scratch / 'lit'}",
        "objective=grpo",
        "data=demo_prompt",
        f"objective.num_generations={s['num_generations']}",
        f"objective.max_completion_length={s['max_completion_length']}",
        f"objective.temperature={TEMPERATURE}",
        "objective.beta=0",
        "objective.loss_type=dapo",
        "objective.num_iterations=1",
        "objective.log_completions_every=0",
        f"data.batch_size={s['batch_completions']}",
        f"data.train_size={s['prompts']}",
        "data.val_size=4",
        "data.test_size=4",
        f"optim.lr={LR}",
        f"trainer.max_steps={s['steps']}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "score=false",
        "logger=none",
        f"callbacks.throughput.warmup_steps={s['warmup']}",
        "callbacks.retention.enabled=false",  # no validation here: the probe would measure nothing
        "~callbacks.adapter_checkpoint",
        "+callbacks.bench_clock._target_=bench.grpo.LitClock",
        *s.get("lit_overrides", []),
    ]
    summary = train.run(overrides)
    g = s["num_generations"]
    clock = this.LitClock.last.clock
    result = clock.steady(s["warmup"], s["batch_completions"] // g, s["batch_completions"])
    result["reward_last_step"] = summary.get("final_reward")
    result["lit_samples_per_s"] = summary.get("samples_per_s")  # the Throughput callback's prompts/s
    result["lit_memory_phases"] = (summary.get("memory") or {}).get("phases")
    result["peak_memory_mb"] = max(before, _peak_rss_mb())
    return result


def _trl(s: dict, scratch: Path) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench.systems import quiet_trainer_args
    from lit_lora.config.schema import ModelConfig, SpeedConfig, TrainConfig
    from lit_lora.data.demo import make_prompts
    from lit_lora.models.builder import build_model
    from lit_lora.rewards.exact_match import exact_match
    from lit_lora.rewards.fields_matched import fields_matched

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name_or_path="embedded:smollm2-135m"), speed=SpeedConfig.off())
    built = build_model(cfg)  # SmolLM2 + the adapter of lit-lora's defaults, plain PEFT
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in make_prompts(s["prompts"], DATA_SEED, held_out_names=False)
    ]
    clock = Clock()
    last_reward = [None]

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()
            rewards = trainer._metrics["train"].get("reward")  # cleared when TRL logs (at the end)
            if rewards:
                last_reward[0] = rewards[-1]

    args = GRPOConfig(
        **quiet_trainer_args(scratch / "trl", s["batch_completions"], LR),
        max_steps=s["steps"],
        gradient_accumulation_steps=1,
        num_generations=s["num_generations"],
        max_completion_length=s["max_completion_length"],
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        num_iterations=1,
        scale_rewards="group",
        reward_weights=[1.0, 0.5],
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=built.model,
        reward_funcs=[exact_match, fields_matched],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=built.tokenizer,
        callbacks=[Marks()],
    )
    generate = trainer._generate

    def timed_generate(prompts):
        started = time.perf_counter()
        out = generate(prompts)
        clock.seconds["rollout"] += time.perf_counter() - started
        clock.completion_tokens += sum(len(ids) for ids in out[1])
        return out

    trainer._generate = timed_generate
    clock.time_logps(trainer, "_get_per_token_logps_and_entropies")
    trainer.train()
    g = s["num_generations"]
    result = clock.steady(s["warmup"], s["batch_completions"] // g, s["batch_completions"])
    result["reward_last_step"] = last_reward[0]
    result["peak_memory_mb"] = _peak_rss_mb()
    return result


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (``/proc/stat``: every state but idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, cores: float = 0.25, window_s: float = 5.0) -> float | None:
    """Wait (at most ``limit_s``) until other processes use fewer than ``cores`` cores over a
    ``window_s`` window; the last window's figure."""
    deadline = time.monotonic() + limit_s
    while True:
        before = _busy_cpu_s()
        if before is None:
            return None
        time.sleep(window_s)
        used = (_busy_cpu_s() - before) / window_s
        if used < cores or time.monotonic() >= deadline:
            return round(used, 2)


def run_system(system: str, settings: dict) -> dict:
    """One system in a fresh process; its ``RESULT {json}`` line, plus the child's peak RSS as the
    parent's ``wait4`` reads it and the cores other processes used meanwhile (a shared machine's noise:
    on a 2-core machine, a busy neighbour can slow torch's threads several times over)."""
    cmd = [sys.executable, "-m", "bench.grpo", "--system", system, "--settings", json.dumps(settings)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        busy, started = _busy_cpu_s(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        busy = None if busy is None else _busy_cpu_s() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["peak_rss_wait4_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
            result["wall_s"] = round(wall, 1)
            if busy is not None:  # the whole machine's busy CPU time less this child's
                others = busy - usage.ru_utime - usage.ru_stime
                result["other_processes_cores"] = round(max(others, 0.0) / wall, 2)
            return result
    raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{stderr[-3000:]}")


# ------------------------------------------------------------------------------------------ report
def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians over the repeats of one system."""
    out = {k: _median([r[k] for r in runs]) for k in ("prompts_per_s", "step_s", "peak_memory_mb")}
    out["peak_rss_wait4_mb"] = _median([r.get("peak_rss_wait4_mb") for r in runs])
    out["split_s"] = {k: _median([r["split_s"][k] for r in runs]) for k in runs[0]["split_s"]}
    out["logps_detail_s"] = {
        k: _median([r["logps_detail_s"][k] for r in runs]) for k in runs[0]["logps_detail_s"]
    }
    out["completion_tokens_per_step"] = _median([r["completion_tokens_per_step"] for r in runs])
    out["rollout_tokens_per_s"] = _median([r["rollout_tokens_per_s"] for r in runs])
    out["cpu_per_wall"] = _median([r["cpu_per_wall"] for r in runs])
    out["other_processes_cores"] = _median([r.get("other_processes_cores") for r in runs])
    return out


def markdown(report: dict) -> str:
    s, table = report["settings"], report["table"]
    lines = [
        f"# GRPO benchmark ({report['date']}, {report['machine']})",
        "",
        f"{s['steps']} optimizer steps ({s['warmup']} warm-up steps left out of the timing) of "
        f"{s['batch_completions'] // s['num_generations']} prompts x G={s['num_generations']} completions, "
        f"up to {s['max_completion_length']} new tokens at temperature {TEMPERATURE}; dapo loss, beta 0, "
        f"one iteration, lr {LR}, LoRA r 8 on q/k/v/o of SmolLM2-135M, {report['precision']}; reward "
        f"exact_match + 0.5 x fields_matched. {report['repeats']} interleaved repeat(s), each system in its "
        "own process; medians.",
        "",
        "| system | prompts/s | step s | rollout s | log-probs s | update s | completion tokens / step | "
        "rollout tokens/s | peak RSS MB | CPU s / wall s | other processes (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        row = table[system]
        split = row["split_s"]
        lines.append(
            f"| {NAMES[system]} | {row['prompts_per_s']} | {row['step_s']} | {split['rollout_s']} | "
            f"{split['logps_s']} | {split['update_s']} | {row['completion_tokens_per_step']} | "
            f"{row['rollout_tokens_per_s']} | {row['peak_memory_mb']} | {row['cpu_per_wall']} | "
            f"{row['other_processes_cores']} |"
        )
    lines += [
        "",
        "Split per optimizer step: rollout = decoding the completions; log-probs = every log-prob forward "
        "(without gradients: none at beta 0 and one iteration; with gradients: the policy's in the loss); "
        "update = the rest (rewards, advantages, loss, backward, optimizer step). CPU s / wall s: the "
        "process's CPU time per second of the timed steps; other processes: the cores the rest of the "
        "machine used during the run (above a few tenths on 2 cores, the figures are disturbed).",
        "",
        "Each run, in order (prompts/s, peak RSS MB):",
        "",
        *[
            f"- {NAMES[system]}: "
            + ", ".join(f"{r['prompts_per_s']} / {r['peak_memory_mb']}" for r in report["runs"][system])
            for system in SYSTEMS
        ],
        "",
        *[f"- {t}" for t in report["targets"]],
        "",
    ]
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = cpu_name()
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import lightning
    import peft
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "lightning": lightning.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=SYSTEMS, help="run one system in this process (internal)")
    parser.add_argument("--settings", help="JSON settings of a --system run (internal)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each system")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {SETTINGS['steps']})")
    parser.add_argument(
        "--warmup", type=int, help=f"steps left out of the timing (default {SETTINGS['warmup']})"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each run, wait up to S seconds until other processes use < 0.25 core",
    )
    parser.add_argument(
        "--lit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra override of lit-lora's run (repeatable; an ablation: name the results with --name)",
    )
    parser.add_argument("--only", choices=SYSTEMS, help="run one system only (no ratio; an experiment)")
    parser.add_argument("--name", default=None, help="results file name (default grpo-cpu; dry run: none)")
    parser.add_argument(
        "--dry-run", action="store_true", help="one tiny step of each (tests), not a measurement"
    )
    args = parser.parse_args()
    if args.system:  # one system, in this process
        settings = json.loads(args.settings)
        with tempfile.TemporaryDirectory() as scratch:
            run = _trl if args.system == "trl" else _lit
            result = run(settings, Path(scratch))
        print("RESULT " + json.dumps(result), flush=True)
        return
    settings = dict(DRY_RUN if args.dry_run else SETTINGS)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    if args.lit:
        settings["lit_overrides"] = args.lit
    if settings["steps"] <= settings["warmup"]:
        parser.error(f"--steps ({settings['steps']}) must exceed --warmup ({settings['warmup']})")
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for repeat in range(args.repeats):
        for system in (args.only,) if args.only else SYSTEMS:
            quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
            runs[system].append(run_system(system, settings))
            r = runs[system][-1]
            r["other_processes_cores_at_start"] = quiet
            print(
                f"repeat {repeat + 1} {system}: {r['prompts_per_s']} prompts/s, split {r['split_s']}, "
                f"peak {r['peak_memory_mb']} MB, cpu/wall {r['cpu_per_wall']}, other processes "
                f"{r.get('other_processes_cores')} cores ({r['wall_s']:.0f} s)",
                flush=True,
            )
    if args.only:  # an experiment: the runs, no ratio and no results file
        print(json.dumps({"settings": settings, "runs": runs[args.only]}, indent=2))
        return
    table = {s: summarize(runs[s]) for s in SYSTEMS}
    speed = table["lit"]["prompts_per_s"] / table["trl"]["prompts_per_s"]
    memory = table["lit"]["peak_memory_mb"] / table["trl"]["peak_memory_mb"]
    targets = [
        f"prompts/s lit-lora / TRL: {speed:.2f}x (target >= 2.0x): {'met' if speed >= 2.0 else 'NOT met'}",
        f"peak memory lit-lora / TRL: {memory:.2f}x (target <= 1.0x): {'met' if memory <= 1.0 else 'NOT met'}",
    ]
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": versions(),
        "precision": "bf16 autocast (lit-lora trainer.precision=bf16-mixed; TRL bf16=True)",
        "settings": settings,
        "repeats": args.repeats,
        "dry_run": args.dry_run,
        "runs": runs,
        "table": table,
        "ratios": {"prompts_per_s": round(speed, 3), "peak_memory": round(memory, 3)},
        "targets": targets,
    }
    name = args.name or (None if args.dry_run else "grpo-cpu")
    if name:
        write_results(name, report, markdown(report))
    print(markdown(report))
    print(f"ratio lit-lora / TRL: prompts/s {speed:.2f}x, peak memory {memory:.2f}x")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
