"""``make gpu-check``: the first command a session lent a CUDA GPU runs, inside a hard time budget.

It proves the GPU paths through the real CLI (``lit-lora train``), one subprocess per step,
in priority order, each with its own timeout; a step that does not fit in what is left of
``--budget-s`` is recorded as ``skipped: no time left`` instead of being started:

1. ``qlora``: single-GPU QLoRA (``quant=nf4``) with validation and base + fine-tuned scoring (scoring
   wall time, and the scoring device where ``summary.json`` records it), then ``qlora_resume``: a new
   run resumed from its ``last.ckpt`` to more steps;
2. ``fp16_mixed_article``: the reference article's experiment (``experiment=mistral7b_qlora``,
   ``16-mixed``) on the small model, with the steps the loss scaler skipped;
3. ``fsdp_nf4``: ``trainer=fsdp quant=nf4 model.gradient_checkpointing=true`` on every visible GPU;
4. ``fp16_true_refused``: ``trainer.precision=16-true`` must be refused at config time, with one
   ``lit-lora: error:`` line, a non-zero exit and no traceback;
5. ``memory_snapshot``: ``callbacks.memory.snapshot_at_step`` dumps a CUDA memory snapshot;
6. ``bench_gpu``: ``python -m bench.gpu --rounds 1 --steps 4`` (Mistral-7B shape, NF4), if time is left.

The model is a random-init Llama (``model=tiny`` made larger through ``model.config_overrides``) with
the SmolLM2 tokenizer from ``.gpu/tokenizer``: the embedded GGUF (98 MB) cannot travel to a device
machine. Run folders go to ``<output root>/runs/gpu-check/<timestamp>/<step>`` (output root:
``$LIT_LORA_OUTPUT_ROOT``, else the repository), never outside it (``lit_lora.paths``). The report,
``bench/results/gpu-<device name>.json``, is rewritten after every step, so a run killed from outside
still leaves what it measured; its ``passed`` maps each step to true, false or null (skipped). The exit
status is 1 if any step failed, 2 without CUDA (unless ``--dry-run``), 3 if the wheels do not install.

``--dry-run`` runs the same steps on the CPU with the unmodified ``model=tiny`` (embedded tokenizer),
a few steps and tiny data; the CUDA-only steps are recorded as ``skipped: needs CUDA``. The tests run
it, so the script cannot rot.

``--prepare-carry`` (here, with network) fills what must travel to a device machine that has no network:
wheels of the packages it lacks in ``.whl/`` (versions from ``requirements/constraints.txt``) and the
tokenizer in ``.gpu/tokenizer``; it prints their size and the device command. ``--install-wheels`` (on
the device) installs ``.whl/*.whl`` into ``--site`` and puts it first on the steps' ``PYTHONPATH``.

Usage:
  python -m bench.gpu_check --dry-run [--out report.json]                        # CPU, ~1 minute
  python -m bench.gpu_check --prepare-carry                                      # before lending a GPU
  python3 -m bench.gpu_check --install-wheels --budget-s 220 --export "$OUT"     # on the device
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WHEELS = ROOT / ".whl"
TOKENIZER = ROOT / ".gpu" / "tokenizer"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
OUTPUT_ROOT_ENV = "LIT_LORA_OUTPUT_ROOT"  # lit_lora.paths.OUTPUT_ROOT_ENV (not imported: keep this light)
CARRY_LIMIT_MB = 64

# What a device machine lacks (the probe of 2026-11-30), carried as wheels. antlr4 is a source
# package on PyPI, so it is built into a wheel here.
CARRIED = (
    "bitsandbytes",
    "hydra-core",
    "omegaconf",
    "datasets",
    "dill",
    "multiprocess",
    "peft",
    "transformers",
)
BUILT_HERE = ("antlr4-python3-runtime",)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
)
DEVICE_PYTHON = "3.12"

# The random model of the device runs: big enough for the GPU to matter, small enough to build in seconds.
GPU_MODEL = [
    "model=tiny",
    "model.config_overrides.hidden_size=512",
    "model.config_overrides.intermediate_size=1408",
    "model.config_overrides.num_hidden_layers=4",
    "model.config_overrides.num_attention_heads=8",
    "model.config_overrides.num_key_value_heads=4",
]
GPU_COMMON = ["trainer.enable_progress_bar=false", "data.test_size=16", "data.score_max_new_tokens=16"]
DRY_COMMON = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data.train_size=32",
    "data.val_size=8",
    "data.test_size=4",
    "data.score_max_new_tokens=4",
]
# Each step's (device, dry-run) optimizer steps.
STEPS = {
    "qlora": (20, 4),
    "qlora_resume": (30, 6),
    "other": (20, 2),
    "fsdp": (10, 2),
    "snapshot": (4, 2),
    "grpo": (4, 2),
}
GRACE_S = 5  # after SIGTERM at a timeout, before SIGKILL
RESERVE_S = 3  # kept back from the budget for writing the report


@dataclass
class Step:
    """One check: a command, its time limits, and how its outcome is judged."""

    name: str
    what: str
    cuda_only: bool
    min_s: float  # not started with less time left than this
    timeout_s: float
    needs: str | None = None  # a step that must have passed first
    excluded: bool = False  # left out by --only
    min_gpus: int = 0  # FSDP: lit-lora refuses it on one device (nothing to shard)
    result: dict = field(default_factory=dict)


def _now() -> float:
    return time.monotonic()


# --------------------------------------------------------------------------------------- running a step
def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict) -> dict:
    """Run ``cmd`` (cwd: the repository) in its own process group, output to ``log``; at ``timeout_s``
    SIGTERM the group, SIGKILL it ``GRACE_S`` later. Returns rc (124 on timeout), wall_s, the output and
    ``times``: for each output chunk, (end offset, seconds since start), to date lines by."""
    started = _now()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a timeout ends the whole group: DDP/FSDP ranks too
    )
    chunks: list[bytes] = []
    times: list[tuple[int, float]] = []

    def read() -> None:
        size = 0
        with log.open("wb") as sink:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    return
                sink.write(chunk)
                sink.flush()
                chunks.append(chunk)
                size += len(chunk)
                times.append((size, _now() - started))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    proc.stdout.close()
    text = b"".join(chunks).decode("utf-8", errors="replace")
    return {
        "rc": 124 if timed_out else proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(_now() - started, 1),
        "output": text,
        "times": times,
    }


def time_of(done: dict, marker: str) -> float | None:
    """Seconds after the start at which ``marker`` first appeared in the output (None: never)."""
    position = done["output"].encode("utf-8", errors="replace").find(marker.encode())
    if position < 0:
        return None
    return next((t for end, t in done["times"] if end > position), None)


def tail(text: str, lines: int = 25, chars: int = 3000) -> str:
    """The end of an output, without tqdm's carriage-return redraws."""
    kept = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])[-chars:]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def figures(summary: dict | None) -> dict:
    """The figures of a run's ``summary.json`` worth comparing across machines."""
    if not summary:
        return {}
    memory = summary.get("memory") or {}
    out = {
        key: summary.get(key)
        for key in (
            "status",
            "global_step",
            "final_train_loss",
            "val_loss",
            "best_val_loss",
            "tokens_per_s",
            "trained_tokens_per_s",
            "step_time_s",
            "mfu",
            "trainable_params",
            "peak_rss_mb",
            "wall_time_s",
            "score_device",
            "score_wall_s",
            "scaler_skipped_steps",
            "final_reward",
            "rollout_time_s",
        )
        if key in summary
    }
    out["memory_device"] = memory.get("device")
    for key in ("peak_allocated_mb", "peak_reserved_mb"):
        if key in memory:
            out[key] = memory[key]
    if memory.get("per_rank"):
        out["peak_allocated_mb_per_rank"] = [r.get("peak_allocated_mb") for r in memory["per_rank"]]
    for key in ("score_base", "score_tuned"):
        if isinstance(summary.get(key), dict):
            out[f"{key}_exact_match"] = summary[key].get("exact_match")
            out["score_rows"] = summary[key].get("n")
    return out


# ------------------------------------------------------------------------------------------ the checks
class Check:
    """Runs the steps in order within the budget and keeps the report up to date on disk."""

    def __init__(self, args, env: dict, run_root: Path, report: dict):
        self.args = args
        self.env = env
        self.run_root = run_root
        self.report = report
        self.deadline = args.started + args.budget_s
        self.cuda = not args.dry_run
        self.devices = report["devices"]

    def left(self) -> float:
        """Seconds a step may still run: the budget less the report's reserve and a timeout's grace."""
        return self.deadline - _now() - RESERVE_S - GRACE_S

    def common(self) -> list[str]:
        if self.args.dry_run:
            return list(DRY_COMMON)
        return [*GPU_MODEL, f"model.tokenizer={TOKENIZER}", *GPU_COMMON]

    def steps_of(self, kind: str) -> int:
        return STEPS[kind][1 if self.args.dry_run else 0]

    def train(self, step: Step, overrides: list[str], first: list[str] | None = None) -> tuple[dict, Path]:
        """``lit-lora train`` for ``step`` in its own run folder under the run root."""
        run_dir = self.run_root / step.name
        cmd = [
            sys.executable, "-m", "lit_lora.train", *(first or []), *self.common(), *overrides,
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        step.result["command"] = " ".join(cmd[1:])
        step.result["run_dir"] = str(run_dir)
        done = run_logged(cmd, self.run_root / f"{step.name}.log", min(step.timeout_s, self.left()), self.env)
        step.result.update({"rc": done["rc"], "wall_s": done["wall_s"]})
        if done["timed_out"]:
            step.result["error"] = f"timed out after {done['wall_s']} s"
        return done, run_dir

    def judge(self, step: Step, done: dict, checks: dict[str, bool | None]) -> None:
        """``passed``: every check that could be made is true (None: not measurable here, noted)."""
        step.result["checks"] = checks
        step.result["passed"] = all(v is not False for v in checks.values())
        if not step.result["passed"]:
            step.result["error_tail"] = tail(done["output"])

    def judge_training(
        self, step: Step, done: dict, run: Path, steps: int, fig: dict | None = None, **checks: bool | None
    ) -> None:
        """Record a training run's figures and judge it: exit 0, ``steps`` reached, a finite training loss,
        plus the step's own ``checks``."""
        fig = figures(read_summary(run)) if fig is None else fig
        step.result["figures"] = fig
        common = {
            "exit_0": done["rc"] == 0,
            f"global_step_{steps}": fig.get("global_step") == steps,
            "train_loss_finite": _finite(fig.get("final_train_loss")),
        }
        self.judge(step, done, {**common, **checks})

    # The steps, each filling step.result.
    def qlora(self, step: Step) -> None:
        n = self.steps_of("qlora")
        done, run = self.train(
            step, ["quant=nf4", f"trainer.max_steps={n}", f"trainer.val_check_interval={n // 2}"]
        )
        fig = figures(read_summary(run))
        where = "cuda" if self.cuda else "cpu"
        scored_on = (fig.get("score_device") or "").split(":")[0] or None
        self.judge_training(
            step, done, run, n, fig,
            summary_completed=fig.get("status") == "completed",
            val_loss_finite=_finite(fig.get("val_loss")),
            scored_base_and_tuned="score_base_exact_match" in fig and "score_tuned_exact_match" in fig,
            adapter_saved=(run / "adapter" / "adapter_model.safetensors").is_file(),
            last_checkpoint=(run / "checkpoints" / "last.ckpt").is_dir(),
            **{
                f"trained_on_{where}": (fig.get("memory_device") or "").startswith(where),
                # None (not judged) where summary.json does not say where scoring ran.
                f"scored_on_{where}": None if scored_on is None else scored_on == where,
            },
        )  # fmt: skip
        if scored_on is None:
            step.result["note"] = "summary.json does not record the scoring device (score_device)"

    def grpo_nf4(self, step: Step) -> None:
        """GRPO with a 4-bit base: rollouts decoded on the training weights on the device, a loss, steps."""
        n = self.steps_of("grpo")
        done, run = self.train(
            step,
            [
                "objective=grpo", "data=demo_prompt", "quant=nf4", f"trainer.max_steps={n}",
                "trainer.limit_val_batches=0", "objective.max_completion_length=16", "data.test_size=8",
            ],
        )  # fmt: skip
        fig = figures(read_summary(run))
        lines = (
            (run / "completions.jsonl").read_text().splitlines()
            if (run / "completions.jsonl").is_file()
            else []
        )
        self.judge_training(
            step, done, run, n, fig,
            reward_logged=_finite(fig.get("final_reward")),
            completions_written=len(lines) > 0,
            rollout_timed=bool((fig.get("rollout_time_s") or {}).get("rollout")),
        )  # fmt: skip

    def qlora_resume(self, step: Step) -> None:
        n, before = self.steps_of("qlora_resume"), self.steps_of("qlora")
        last = self.run_root / "qlora" / "checkpoints" / "last.ckpt"
        done, run = self.train(
            step,
            [
                "quant=nf4",
                f"trainer.max_steps={n}",
                f"trainer.val_check_interval={before // 2}",
                f"resume={last}",
                "score=false",
            ],
        )
        self.judge_training(
            step, done, run, n, **{f"resumed_from_step_{before}": f"(step {before})" in done["output"]}
        )

    def fp16_mixed_article(self, step: Step) -> None:
        n = self.steps_of("other")
        done, run = self.train(
            step,
            [f"trainer.max_steps={n}", f"trainer.val_check_interval={n}", "score=false"],
            first=["experiment=mistral7b_qlora"],
        )
        self.judge_training(step, done, run, n)

    def fsdp_nf4(self, step: Step) -> None:
        n = self.steps_of("fsdp")
        done, run = self.train(
            step,
            [
                "trainer=fsdp",
                "quant=nf4",
                "model.gradient_checkpointing=true",
                f"trainer.devices={self.devices}",
                f"trainer.max_steps={n}",
                f"trainer.val_check_interval={n}",
                "score=false",
            ],
        )
        self.judge_training(
            step, done, run, n, adapter_saved=(run / "adapter" / "adapter_model.safetensors").is_file()
        )

    def fp16_true_refused(self, step: Step) -> None:
        done, run = self.train(step, ["trainer.precision=16-true", "trainer.max_steps=2", "score=false"])
        lines = [ln for ln in done["output"].splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("lit-lora: error:")]
        step.result["message"] = errors[-1] if errors else (lines[-1] if lines else "")
        self.judge(
            step,
            done,
            {
                "exit_nonzero": done["rc"] not in (0, 124),
                "one_error_line": len(errors) == 1,
                "no_traceback": "Traceback" not in done["output"],
                # Refused at config time: before the model loads (train.py prints "model ..." once loaded).
                "refused_before_model_load": not any(ln.startswith("lit-lora: model ") for ln in lines),
                "no_summary": read_summary(run) is None,
            },
        )

    def memory_snapshot(self, step: Step) -> None:
        n = self.steps_of("snapshot")
        done, run = self.train(
            step,
            [
                "quant=nf4",
                f"trainer.max_steps={n}",
                f"trainer.val_check_interval={n}",
                "score=false",
                f"callbacks.memory.snapshot_at_step={n // 2}",
            ],
        )
        snapshots = sorted(run.glob("memory-snapshot-*.pickle"))
        fig = figures(read_summary(run))
        fig["snapshots"] = {p.name: p.stat().st_size for p in snapshots}
        step.result["figures"] = fig
        self.judge(
            step,
            done,
            {
                "exit_0": done["rc"] == 0,
                "snapshot_written": any(size > 0 for size in fig["snapshots"].values()),
            },
        )

    def bench_gpu(self, step: Step) -> None:
        out = self.run_root / "bench_gpu" / "bench-gpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.gpu", "--rounds", "1", "--steps", "4", "--out", str(out)]
        step.result["command"] = " ".join(cmd[1:])
        done = run_logged(cmd, self.run_root / "bench_gpu.log", min(step.timeout_s, self.left()), self.env)
        step.result.update({"rc": done["rc"], "wall_s": done["wall_s"]})
        if done["timed_out"]:
            step.result["error"] = f"timed out after {done['wall_s']} s"
        try:
            bench = json.loads(out.read_text())
        except (OSError, ValueError):
            bench = {}
        step.result["figures"] = {
            "summary": bench.get("summary"),
            "targets": bench.get("targets"),
            "runs": bench.get("runs"),
        }
        self.judge(step, done, {"exit_0": done["rc"] == 0, "report_written": bool(bench)})

    def run(self, steps: list[Step]) -> None:
        by_name = {s.name: s for s in steps}
        for step in steps:
            step.result = {"what": step.what}
            needed = by_name.get(step.needs) if step.needs else None
            if step.excluded:
                step.result.update(status="skipped: not in --only", passed=None)
            elif step.cuda_only and not self.cuda:
                step.result.update(status="skipped: needs CUDA", passed=None)
            elif self.devices < step.min_gpus:
                step.result.update(
                    status=f"skipped: needs {step.min_gpus} GPUs, {self.devices} here", passed=None
                )
            elif needed is not None and needed.result.get("passed") is not True:
                step.result.update(status=f"skipped: {needed.name} did not pass", passed=None)
            elif self.left() < step.min_s:
                step.result.update(
                    status=f"skipped: no time left ({self.left():.0f} s left, needs ~{step.min_s:.0f} s)",
                    passed=None,
                )
            else:
                print(
                    f"gpu-check: {step.name} (up to {min(step.timeout_s, self.left()):.0f} s) ...", flush=True
                )
                try:
                    getattr(self, step.name)(step)
                except Exception as err:  # a bug of this script must not lose the other steps' results
                    step.result.update(passed=False, error=f"gpu_check itself failed: {err!r}")
                step.result["status"] = "passed" if step.result.get("passed") else "failed"
            self.report["steps"][step.name] = step.result
            self.report["passed"][step.name] = step.result.get("passed")
            self.save()
            extra = f" rc={step.result['rc']} {step.result['wall_s']} s" if "rc" in step.result else ""
            print(f"gpu-check: {step.name}: {step.result['status']}{extra}", flush=True)
            if step.result.get("passed") is False:
                print(tail(step.result.get("error_tail", step.result.get("error", "")), 8), flush=True)

    def save(self) -> None:
        self.report["wall_s"] = round(_now() - self.args.started, 1)
        self.report["all_passed"] = all(v is not False for v in self.report["passed"].values())
        text = json.dumps(self.report, indent=2) + "\n"
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(text)
        if self.args.export:
            self.args.export.mkdir(parents=True, exist_ok=True)
            (self.args.export / self.args.out.name).write_text(text)


def plan(devices: int) -> list[Step]:
    """The steps in priority order, with the seconds each needs at least and may take at most (device
    figures: each CLI run took 20-30 s on an H200, mostly imports)."""
    return [
        Step("qlora", "single-GPU QLoRA (nf4): validation, base + fine-tuned scoring", False, 35, 150),
        Step("qlora_resume", "resume the qlora run from last.ckpt to more steps", False, 25, 100, needs="qlora"),
        Step("fp16_mixed_article", "experiment=mistral7b_qlora (16-mixed, nf4 fp16 compute) on the small model",
             True, 25, 100),
        Step("fsdp_nf4", f"trainer=fsdp quant=nf4 model.gradient_checkpointing=true on {devices} GPU(s)",
             True, 30, 120, min_gpus=2),
        Step("grpo_nf4", "objective=grpo quant=nf4: rollouts on the training weights, 4 steps", False, 30, 120),
        Step("fp16_true_refused", "trainer.precision=16-true refused at config time", False, 12, 60),
        Step("memory_snapshot", "callbacks.memory.snapshot_at_step: a CUDA memory snapshot", True, 25, 90),
        Step("bench_gpu", "python -m bench.gpu --rounds 1 --steps 4 (Mistral-7B shape, NF4)", True, 90, 300),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ machine and setup
def versions() -> dict:
    """Versions of what the steps import, as their ``PYTHONPATH`` resolves them (read from metadata:
    importing them here would cost seconds of the budget)."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "hydra-core", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else "unknown (no git)"


def install_wheels(site: Path, env: dict) -> dict:
    """``pip install --no-index --no-deps`` of ``.whl/*.whl`` into ``site``, first on the path of this
    process and of the steps."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"error": f"no wheels in {WHEELS}: run python -m bench.gpu_check --prepare-carry first"}
    started = _now()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": tail(done.stderr or done.stdout)}
    sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), env.get("PYTHONPATH")) if p)
    return {"site": str(site), "wheels": [w.name for w in wheels], "install_s": round(_now() - started, 1)}


def pinned(names) -> dict[str, str]:
    """``name -> version`` from ``requirements/constraints.txt`` (names compared normalised)."""
    wanted = {_norm(n): n for n in names}
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and _norm(name) in wanted:
            out[wanted[_norm(name)]] = version.strip()
    missing = set(names) - set(out)
    if missing:
        raise SystemExit(f"gpu-check: {CONSTRAINTS} pins no version of {', '.join(sorted(missing))}")
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _have_wheel(name: str, version: str) -> bool:
    return any(
        _norm(w.name.split("-")[0]) == _norm(name) and w.name.split("-")[1] == version
        for w in WHEELS.glob("*.whl")
    )


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def device_command(budget_s: int) -> str:
    return f'python3 -m bench.gpu_check --install-wheels --budget-s {budget_s} --export "$OUT"'


def prepare_carry(budget_s: int) -> int:
    """Fill ``.whl/`` and ``.gpu/tokenizer`` (only what is missing) and print the device command."""
    versions_of = pinned(CARRIED + BUILT_HERE)
    WHEELS.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    missing = [f"{n}=={v}" for n, v in versions_of.items() if n in CARRIED and not _have_wheel(n, v)]
    if missing:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
               "--implementation", "cp", *platforms, "-d", str(WHEELS), *missing]  # fmt: skip
        print("gpu-check: " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    built = [f"{n}=={v}" for n, v in versions_of.items() if n in BUILT_HERE and not _have_wheel(n, v)]
    if built:
        cmd = [*pip, "wheel", "--no-deps", "-w", str(WHEELS), *built]
        print("gpu-check: " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    if not (TOKENIZER / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from lit_lora.models import embedded

        source = embedded.resolve("embedded:smollm2-135m")
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(TOKENIZER))
        print(f"gpu-check: tokenizer of {source} saved to {TOKENIZER}", flush=True)
    expected = {(_norm(n), v) for n, v in versions_of.items()}
    stale = [
        w.name
        for w in WHEELS.glob("*.whl")
        if (_norm(w.name.split("-")[0]), w.name.split("-")[1]) not in expected
    ]
    wheels_mb, tokenizer_mb = _size_mb(WHEELS), _size_mb(TOKENIZER)
    total = wheels_mb + tokenizer_mb
    print(f"gpu-check: .whl/ {wheels_mb:.1f} MiB ({len(list(WHEELS.glob('*.whl')))} wheels), "
          f".gpu/tokenizer {tokenizer_mb:.1f} MiB: {total:.1f} MiB of the {CARRY_LIMIT_MB} MiB that travel")  # fmt: skip
    if stale:
        print(f"gpu-check: warning: wheels not pinned by constraints.txt (delete them?): {', '.join(stale)}")
    if total > CARRY_LIMIT_MB:
        print(f"gpu-check: warning: over the {CARRY_LIMIT_MB} MiB carry limit", file=sys.stderr)
        return 1
    print('gpu-check: on the device machine (run tool), carry [".whl", ".gpu/tokenizer"] and run:')
    print(f"  {device_command(budget_s)}")
    return 0


def export_runs(run_root: Path, export: Path) -> None:
    """The small files of every run folder (summary, logs, config, metrics, snapshots, bench report) as
    ``gpu-check-runs.tgz`` in ``export``: adapters, checkpoints and data stay behind."""
    keep = {"summary.json", "config.yaml", "metrics.csv", "train.log", "bench-gpu.json"}
    with tarfile.open(export / "gpu-check-runs.tgz", "w:gz") as tar:
        for path in sorted(run_root.rglob("*")):
            if not path.is_file() or {"adapter", "checkpoints", "data"} & set(
                path.relative_to(run_root).parts
            ):
                continue
            if path.name in keep or path.suffix == ".log" or path.name.startswith("memory-snapshot-"):
                tar.add(path, arcname=str(Path(run_root.name) / path.relative_to(run_root)))


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on the CPU, tiny model and data"
    )
    parser.add_argument("--budget-s", type=float, default=540, help="hard limit for all steps (default 540)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default bench/results/gpu-<device>.json; dry run: in its run root)",
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="also copy the report and the runs' small files here (on the device: $OUT)",
    )
    parser.add_argument(
        "--install-wheels", action="store_true", help="pip install .whl/*.whl into --site first"
    )
    parser.add_argument("--site", type=Path, default=Path("/tmp/lit-lora-site"))
    parser.add_argument(
        "--prepare-carry",
        action="store_true",
        help="fill .whl/ and .gpu/tokenizer for a device machine, print the command",
    )
    parser.add_argument("--code", default=None, help="the commit tested (default: git, where .git travelled)")
    parser.add_argument("--only", default=None, help="comma-separated step names to run (others: skipped)")
    args = parser.parse_args(argv)  # fmt: skip
    args.started = _now()
    if args.prepare_carry:
        return prepare_carry(int(args.budget_s))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    install = install_wheels(args.site, env) if args.install_wheels else None
    if install and "error" in install:
        print(f"gpu-check: the wheels did not install: {install['error']}", file=sys.stderr)
        return 3

    import torch

    if not args.dry_run:
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; run with --dry-run to check the script on the CPU",
                  file=sys.stderr)  # fmt: skip
            return 2
        if not (TOKENIZER / "tokenizer.json").is_file():
            print(f"gpu-check: no tokenizer in {TOKENIZER}: run python -m bench.gpu_check --prepare-carry",
                  file=sys.stderr)  # fmt: skip
            return 2
        env.setdefault("LIT_LORA_CACHE", "/tmp/lit-lora-cache")
    gpu = torch.cuda.get_device_name(0) if not args.dry_run else None
    gpu_memory_gib = (
        round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if not args.dry_run else None
    )
    devices = torch.cuda.device_count() if not args.dry_run else 1
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output_root = Path(os.path.abspath(os.environ.get(OUTPUT_ROOT_ENV) or ROOT))
    run_root = output_root / "runs" / "gpu-check" / (f"{stamp}-dry-run" if args.dry_run else stamp)
    run_root.mkdir(parents=True, exist_ok=False)
    if args.out is None:
        args.out = (
            run_root / "gpu-check.json"
            if args.dry_run
            else RESULTS / f"gpu-{gpu.replace(' ', '_').replace('/', '_')}.json"
        )
    report = {
        "gpu": gpu or "none: --dry-run on the CPU",
        "devices": devices,
        "dry_run": args.dry_run,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "code": f"lit-lora {args.code or git_state()}",
        "gpu_memory_gib": gpu_memory_gib,
        "versions": {**versions(), "cuda": torch.version.cuda},
        "model": " ".join(DRY_COMMON[:1] if args.dry_run else GPU_MODEL) + " (random init)",
        "budget_s": args.budget_s,
        "run_root": str(run_root),
        "wheels": install,
        "passed": {},
        "all_passed": True,
        "steps": {},
        "wall_s": 0.0,
    }
    steps = plan(devices)
    if args.only:
        chosen = set(args.only.split(","))
        for step in steps:
            step.excluded = step.name not in chosen
    check = Check(args, env, run_root, report)
    print(
        f"gpu-check: {report['gpu']}, {devices} device(s); runs in {run_root}; report {args.out}", flush=True
    )
    check.run(steps)
    if args.export:
        export_runs(run_root, args.export)
    failed = [name for name, ok in report["passed"].items() if ok is False]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'no step failed'} "
          f"({report['wall_s']} s); report {args.out}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
