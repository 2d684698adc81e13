"""Fine-tune a causal LM with LoRA or QLoRA: ``lit-lora train [overrides]``.

:func:`train` takes a composed config and returns the run summary (tests call it directly);
:func:`main` is only the Hydra wiring and the translation of user mistakes into one-line errors.

Run folder (``output_dir``), the contract with later commands:

- ``config.yaml``          the resolved config of the run
- ``data/``                the rows used (the demo task writes its splits here)
- ``adapter/``             PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``),
                           tokenizer and ``rendering.json``
- ``checkpoints/``         adapter-only checkpoints (``step-NNNNNN.ckpt/``, ``last.ckpt/``), see
                           :mod:`lit_lora.training.checkpoint_io`; ``resume=auto`` continues from the newest
- ``metrics.csv``          per-step metrics (Lightning's CSV logger)
- ``wandb/``, ``tensorboard/``  with ``logger=wandb`` / ``logger=tensorboard``
- ``summary.json``         data counts, trainable params, losses, held-out scores, tokens/s, memory,
                           wall time, status
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lit_lora.config.device import check_device
from lit_lora.config.schema import TrainConfig, to_train_config
from lit_lora.errors import DiskFull, Interrupted, OutOfMemory, RankLost, UserError, exit_with
from lit_lora.loggers.wandb_logger import finish_runs, flat_config, redacted_config
from lit_lora.paths import confined

# Only light modules at import time: a config mistake (Hydra's or lit-lora's checks) then ends the
# command in about a second instead of after the ~7 s import of torch, Lightning and PEFT, which the
# functions below import when a run really starts.
from lit_lora.training import faults
from lit_lora.training.sweep import record_failure

log = logging.getLogger("lit_lora")
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"


def _rank() -> int:
    """This process's global rank, as Lightning's ``rank_zero_only`` reads it from the environment."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank


def _say(message: str) -> None:
    """A progress line on stdout, from rank zero only (other ranks run the same code)."""
    if _rank() == 0:
        print(f"lit-lora: {message}", flush=True)


def _instantiate_all(group: str, nodes: DictConfig) -> list:
    from hydra.utils import instantiate

    objects = []
    for key, node in nodes.items():
        if node is None:
            continue
        try:
            objects.append(instantiate(node))
        except Exception as err:  # hydra wraps import and argument errors in several types
            cause = err.__cause__ or err  # hydra's wrapper says where; the cause says what
            raise UserError(
                f"{group}.{key}: cannot build {node.get('_target_')}: {str(cause).splitlines()[0]}"
            ) from err
    return objects


def _accepted_keys(target: str) -> set[str] | None:
    """Keyword arguments ``target`` (a class or function path) accepts; None if it takes any."""
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    keys: set[str] = set()
    for owner in obj.__mro__ if inspect.isclass(obj) else (obj,):
        init = owner.__init__ if inspect.isclass(obj) else owner
        if inspect.isclass(obj) and "__init__" not in vars(owner):
            continue
        params = inspect.signature(init).parameters.values()
        keys |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return keys
    return None


def check_plugin_keys(cfg: DictConfig) -> None:
    """Unknown keys of ``callbacks.*`` and ``logger.*`` (free-form groups the schema cannot type) fail
    here, before the model loads, naming the dotted key and the closest valid one."""
    import difflib

    for group in ("callbacks", "logger"):
        for key, node in (cfg.get(group) or {}).items():
            if node is None or "_target_" not in node:
                continue
            try:
                accepted = _accepted_keys(node["_target_"])
            except (ImportError, AttributeError, ValueError) as err:
                raise UserError(
                    f"{group}.{key}._target_={node['_target_']}: cannot import it ({err})"
                ) from err
            if accepted is None:
                continue
            for name in node:
                if not str(name).startswith("_") and name not in accepted:
                    close = difflib.get_close_matches(str(name), sorted(accepted), n=1)
                    hint = f"; did you mean {group}.{key}.{close[0]}?" if close else ""
                    raise UserError(f"unknown key {group}.{key}.{name} ({node['_target_']}){hint}")


def _peak_rss_mb() -> float:
    """Peak resident memory since this job started (see :func:`lit_lora.process.reset_peak_rss`)."""
    from lit_lora.process import process_memory_mb

    return process_memory_mb()["peak_rss_mb"]


# What the CSV logger writes (lit_lora.loggers.csv_logger); an earlier run's copies are kept on resume.
LOGGER_FILES = ("metrics.csv", "hparams.yaml")


def _check_fresh(out: Path, resuming: bool) -> None:
    """Refuse to reuse a run folder that already holds results: nothing of an earlier run is overwritten.
    An interrupted run's logs (no results yet) are continued with ``resume=auto``, which keeps them."""
    for name in ("adapter", SUMMARY_FILE):
        if (out / name).exists():
            raise UserError(f"{out / name} exists from an earlier run; choose another output_dir")
    # Rank zero's only: under DDP the other ranks start once rank zero has begun writing these.
    for name in () if resuming or _rank() != 0 else LOGGER_FILES:
        if (out / name).exists():
            raise UserError(
                f"{out / name} exists from an interrupted run; continue it with resume=auto, "
                "or choose another output_dir"
            )


def _resume_from(resume: str | None, out: Path) -> Path | None:
    """The checkpoint folder to resume from (None: start at step 0); see ``TrainConfig.resume``."""
    from lit_lora.training.checkpoint_io import checkpoint_step, clean_stale, find_resumable

    if not resume:
        return None
    if resume == "auto":
        if clean_stale(out / CHECKPOINTS):
            _say("removed the temporary files of a checkpoint save that did not complete")
        found = find_resumable(out / CHECKPOINTS)
        if found is None:
            _say(f"resume=auto: no complete checkpoint in {out / CHECKPOINTS}; starting at step 0")
        return found
    path = Path(resume).expanduser()
    if checkpoint_step(path) is None:
        raise UserError(
            f"resume={resume}: not a complete lit-lora checkpoint folder (step-<NNNNNN>.ckpt or last.ckpt)"
        )
    return path


# Keys of callbacks and loggers that name a folder they write into.
PLUGIN_PATH_KEYS = ("dirpath", "save_dir", "snapshot_dir", "log_dir", "root_dir")


def _checked_output_paths(cfg: DictConfig, tc: TrainConfig) -> Path:
    """The run folder, after checking that it and every folder a callback or logger writes into lie
    inside the output root (:mod:`lit_lora.paths`). Nothing has been written when this raises."""
    out = confined("output_dir", tc.output_dir, tc.output_root)
    for group in ("callbacks", "logger"):
        for name, spec in (cfg.get(group) or {}).items():
            for key in PLUGIN_PATH_KEYS:
                value = spec.get(key) if isinstance(spec, DictConfig) else None
                if isinstance(value, str):
                    confined(f"{group}.{name}.{key}", value, tc.output_root)
    return out


def _oom_message(tc: TrainConfig, out: Path, trainer) -> str:
    from lit_lora.training.checkpoint_io import find_resumable

    last = find_resumable(out / CHECKPOINTS)
    return (
        f"out of device memory at step {trainer.global_step + 1} with micro-batch data.batch_size="
        f"{tc.data.batch_size} and sequences up to data.max_seq_len={tc.data.max_seq_len}. Try: a smaller "
        f"data.batch_size with trainer.accumulate_grad_batches={2 * tc.trainer.accumulate_grad_batches} (same "
        "effective batch), model.gradient_checkpointing=true, quant=nf4, or a smaller data.max_seq_len. "
        f"Newest complete checkpoint: {last or 'none yet'}"
    )


def _keep_earlier_files(out: Path, step: int) -> None:
    """On resume in the same folder, keep what the interrupted run wrote: the CSV logger writes a new
    metrics.csv and hparams.yaml (:mod:`lit_lora.loggers.csv_logger`), so the earlier ones are renamed first,
    to ``metrics.until-step-<step>.csv`` (``-2``, ``-3``... when a run was interrupted twice there)."""
    for name in LOGGER_FILES:
        if (out / name).exists():
            stem, suffix = name.split(".")
            target, n = out / f"{stem}.until-step-{step}.{suffix}", 1
            while target.exists():
                n += 1
                target = out / f"{stem}.until-step-{step}-{n}.{suffix}"
            (out / name).rename(target)


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary written to ``summary.json`` and the live objects."""

    summary: dict
    output_dir: Path
    model: object  # the trained peft.PeftModel (a torch.nn.Module)
    tokenizer: object


def train(cfg: DictConfig) -> TrainResult:
    """Run one fine-tuning job described by ``cfg`` (composed from ``conf/train.yaml``).

    Writes the run folder described in this module's docstring and returns its summary with the model.
    Raises :class:`UserError` for mistakes in the config, data or environment.
    """
    import lightning as L

    from lit_lora.console import quiet_library_progress_bars
    from lit_lora.process import reset_peak_rss
    from lit_lora.progress import interactive
    from lit_lora.training.checkpoint_io import checkpoint_step
    from lit_lora.training.graceful import GracefulStop
    from lit_lora.training.strategies import fsdp_storage_dtype

    started = time.perf_counter()
    reset_peak_rss()  # this job's own peak, also when a sweep runs jobs one after another in one process
    tc: TrainConfig = to_train_config(cfg)
    check_device(tc)  # imports torch only; the plugin check below imports Lightning (seconds)
    check_plugin_keys(cfg)
    out = _checked_output_paths(cfg, tc)
    _check_fresh(out, resuming=bool(tc.resume))
    out.mkdir(parents=True, exist_ok=True)
    resume_from = _resume_from(tc.resume, out)
    if tc.resume and _rank() == 0:  # also when resume=auto finds no checkpoint: logs are kept
        # Rank zero alone: ranks started later would rename the files rank zero has begun anew.
        _keep_earlier_files(out, checkpoint_step(resume_from) if resume_from is not None else 0)
    if not interactive():
        quiet_library_progress_bars()  # in a log file, lit-lora's own progress lines only
    storage = fsdp_storage_dtype(tc)
    if storage is not None:
        # Decided before config.yaml is written, so that it records the storage dtype that ran.
        _say(f"FSDP: 4-bit weights stored as {storage} (one dtype per FSDP unit; same bytes)")
        cfg.quant.storage_dtype = tc.quant.storage_dtype = storage
    # Installed before config.yaml and the model (minutes for a large one): a SIGTERM from then on is
    # kept and honoured at the first step boundary with a checkpoint, not a kill half way through a load.
    stopper = GracefulStop(out / CHECKPOINTS, tc.grace_period_s)
    stopper.install(sigusr1=False)
    try:
        config_yaml = OmegaConf.to_yaml(redacted_config(cfg))  # secrets from ${oc.env:...} become ***
        if not (out / "config.yaml").exists():
            (out / "config.yaml").write_text(config_yaml)
        elif (out / "config.yaml").read_text() != config_yaml:
            (out / f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml").write_text(config_yaml)
        L.seed_everything(tc.seed, workers=True, verbose=False)
        return _build_and_fit(cfg, tc, out, resume_from, started, stopper)
    finally:
        stopper.uninstall()


@dataclass
class Job:
    """One training run as :func:`train` builds it, step by step: each ``_setup_*`` step fills its part,
    :func:`_fit` trains, the ``_summary`` / ``_score_held_out`` / ``_finish`` steps report."""

    cfg: DictConfig
    tc: TrainConfig
    out: Path
    resume_from: Path | None
    started: float  # time.perf_counter() when the command started
    stopper: object  # the GracefulStop installed before the model load
    built: object = None  # lit_lora.models.builder.Built
    data: object = None  # lit_lora.data.module.DataModule, set up
    module: object = None  # lit_lora.training.module.LitLoRA
    callbacks: list = dataclasses.field(default_factory=list)
    loggers: list = dataclasses.field(default_factory=list)
    trainer: object = None  # lightning.Trainer


def _build_and_fit(cfg, tc: TrainConfig, out: Path, resume_from, started: float, stopper) -> TrainResult:
    """The body of :func:`train`: set the job up, fit it, then score it and write its summary."""
    job = Job(cfg, tc, out, resume_from, started, stopper)
    _setup_model_and_data(job)
    _setup_callbacks_and_loggers(job)
    summary: dict | None = None
    try:
        _report_setup(job)
        _setup_trainer(job)
        _fit(job)
        summary = _summary(job)
        _score_held_out(job, summary)
        _finish(job, summary)
    finally:
        # One W&B run per job, finished even when training failed; the summary goes with it.
        finish_runs(job.loggers, summary, out / "adapter", failed=summary is None, say=_say)
    return TrainResult(summary, out, job.built.model, job.built.tokenizer)


def _setup_model_and_data(job: Job) -> None:
    """The model (the one builder), the data module (read, validated, tokenized) and the LightningModule."""
    from lit_lora.data.module import DataModule
    from lit_lora.models.builder import build_model
    from lit_lora.training.module import LitLoRA

    tc = job.tc
    job.built = build_model(tc)
    grpo = {}
    if tc.objective.online:  # prompts only: the rest of each row is the completion's room
        grpo = {
            "max_prompt_len": tc.data.max_seq_len - tc.objective.max_completion_length,
            "num_generations": tc.objective.num_generations,
            "num_iterations": tc.objective.num_iterations,
        }
    job.data = DataModule(tc.data, job.built.tokenizer, job.out / "data", **grpo)
    job.data.setup()
    if job.built.speedups.lit_attention and tc.data.packing:
        _say("packing: attention runs per packed example (segment attention, lit_lora.speedups.attention)")
    job.module = LitLoRA(
        job.built.model,
        tc.optim,
        tokenizer=job.built.tokenizer,
        rendering=job.data.rendering,
        chunked_loss=tc.speed.chunked_loss,
        right_padding_mask=tc.speed.right_padding_mask,
        on_nonfinite=tc.on_nonfinite,
        max_nonfinite_skips=tc.max_nonfinite_skips,
        objective=tc.objective,
        grpo=_grpo_step(job) if tc.objective.online else None,
    )


def _grpo_step(job: Job):
    """GRPO's rollouts, rewards and loss for the module (:mod:`lit_lora.training.grpo_step`)."""
    from lit_lora.rewards.loading import load_rewards
    from lit_lora.speedups.chunked_loss import supports_chunked_loss
    from lit_lora.training.grpo_step import GRPOStep

    tc = job.tc
    chunked = (
        tc.speed.chunked_loss and supports_chunked_loss(job.built.model) and tc.trainer.strategy != "fsdp"
    )
    return GRPOStep(
        tc.objective,
        load_rewards(tc.rewards),
        tokenizer=job.built.tokenizer,
        seed=tc.seed,
        chunked=chunked,
        run_dir=job.out,
    )


def _setup_callbacks_and_loggers(job: Job) -> None:
    """The ``callbacks`` and ``logger`` groups, instantiated (a plugin that cannot be built is a
    :class:`UserError` naming it), plus the precomputed DPO reference when asked for."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = _instantiate_all("callbacks", job.cfg.callbacks)
    if job.tc.objective.precompute_ref:
        callbacks.append(_precomputed_reference(job.tc, job.out))
    job.loggers = [lg for lg in _instantiate_all("logger", job.cfg.logger) if lg is not None]
    if not job.loggers:
        # logger=none: Lightning's LearningRateMonitor refuses a Trainer without a logger; it has
        # nothing to write to, so it is left out rather than failing the run at its first step.
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    job.callbacks = callbacks


def _precomputed_reference(tc: TrainConfig, out: Path):
    """The callback of ``objective.precompute_ref``, keyed by what the reference computes with."""
    from lit_lora.models.embedded import file_digest
    from lit_lora.training.reference import REFERENCE_FOLDER, PrecomputedReference

    ref = tc.objective.ref_adapter
    identity = {
        "model": tc.model.name_or_path,
        "revision": tc.model.revision,
        "quant": dataclasses.asdict(tc.quant),
        "precision": str(tc.trainer.precision),
        "speed": dataclasses.asdict(tc.speed),
        "ref_adapter": file_digest(Path(ref) / "adapter_model.safetensors") if ref else None,
    }
    return PrecomputedReference(out / REFERENCE_FOLDER, identity, tc.data.eval_batch_size)


def _report_setup(job: Job) -> None:
    """The config to the loggers; the model, trainable parameters and data counts on the console."""
    built = job.built
    for logger in job.loggers:
        logger.log_hyperparams(flat_config(redacted_config(job.cfg)))
    _say(f"model {built.source} ({type(built.model.base_model.model).__name__}), quant={job.tc.quant.method}")
    # The adapter's own settings: with lora.init_from they come from the loaded adapter, not lora.r.
    adapter = built.model.peft_config[built.model.active_adapter]
    _say(
        f"trainable params {built.trainable_params:,} of {built.total_params:,} "
        f"({built.trainable_pct:.3f}%), LoRA r={adapter.r} alpha={adapter.lora_alpha} on {built.target_modules}"
    )
    _report_data(job.data.stats, job.tc.data.on_bad_row)


def _setup_trainer(job: Job) -> None:
    """The Lightning Trainer: strategy, progress display, lit-lora's checkpoint plugin; a trainer setting
    Lightning refuses is a :class:`UserError`. Says the effective batch and tokens per optimizer step."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_lora.progress import ProgressLines, StepProgressBar, interactive
    from lit_lora.training.checkpoint_io import SafetensorsCheckpointIO, checkpoint_step
    from lit_lora.training.launcher import launcher_of
    from lit_lora.training.strategies import build_strategy

    tc, data = job.tc, job.data
    trainer_kwargs = OmegaConf.to_container(job.cfg.trainer, resolve=True)
    trainer_kwargs.pop("process_group_timeout_s")  # lit-lora's, given to the strategy
    trainer_kwargs["strategy"] = build_strategy(tc, job.built)
    # A bar on a terminal; in a log file (stdout not a terminal) plain lines instead (lit_lora.progress).
    show_bar = tc.trainer.enable_progress_bar and interactive()
    trainer_kwargs["enable_progress_bar"] = show_bar
    job.callbacks = [
        *job.callbacks,
        StepProgressBar() if show_bar else ProgressLines(tc.trainer.log_every_n_steps),
    ]
    if not data.examples["val"]:
        trainer_kwargs["limit_val_batches"] = 0  # no validation rows: data.val_fraction=0 and no val_source
    try:
        trainer = L.Trainer(
            **trainer_kwargs,
            callbacks=job.callbacks,
            logger=job.loggers or False,
            default_root_dir=str(job.out),
            # Checkpoints hold the adapter only, as safetensors + JSON (lit_lora.training.checkpoint_io); Lightning
            # writes none of its own unless a checkpoint callback (callbacks/adapter_checkpoint) is on.
            plugins=[SafetensorsCheckpointIO()],
            # The training sampler shards by rank itself (lit_lora.data.batching.StepBatchSampler).
            use_distributed_sampler=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in job.callbacks),
            # lit-lora prints the trainable / total parameters itself; Lightning's table of one PeftModel
            # row says less and warns that it cannot size bf16-mixed.
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        # e.g. trainer.devices=4 on a 2-device machine, an unknown accelerator or strategy name
        raise UserError(f"trainer: {str(err).splitlines()[0]}") from err
    world = trainer.world_size
    effective_batch = tc.data.batch_size * tc.trainer.accumulate_grad_batches * world
    if tc.objective.online:
        g = tc.objective.num_generations
        _say(
            f"effective batch {effective_batch} completions = {effective_batch // g} prompts x {g} generations "
            f"({tc.data.batch_size} x {tc.trainer.accumulate_grad_batches} accum x {world} devices); up to "
            f"{tc.objective.max_completion_length} new tokens each, {tc.objective.num_iterations} optimizer "
            "step(s) per round of rollouts"
        )
    else:
        _say(
            f"effective batch {effective_batch} = {tc.data.batch_size} x "
            f"{tc.trainer.accumulate_grad_batches} accum x {world} devices; ~{effective_batch * data.tokens_per_example():.0f} tokens "
            f"({effective_batch * data.trained_tokens_per_example():.0f} trained) per optimizer step"
        )
    if job.resume_from is not None:
        _say(f"resuming from {job.resume_from} (step {checkpoint_step(job.resume_from)})")
    launcher = launcher_of(trainer)
    if launcher is not None:  # the line that reports a lost rank names the newest complete checkpoint
        launcher.checkpoints = job.out / CHECKPOINTS
    job.trainer = trainer


def _fit(job: Job) -> None:
    """``trainer.fit``, with the stop signals installed; failures become lit-lora's exit statuses
    (143 stopped, 3 out of memory, 4 disk full, 5 another rank died). The process group ends here on
    every rank."""
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_lora.training.checkpoint_io import find_resumable
    from lit_lora.training.distributed import end_process_group
    from lit_lora.training.graceful import GracefulStop
    from lit_lora.training.launcher import launcher_of, lost_rank

    trainer, out, resume_from = job.trainer, job.out, job.resume_from
    trainer.callbacks.append(job.stopper)
    job.stopper.install(sigusr1=not GracefulStop.slurm_requeue(trainer))
    fitted = False
    try:
        trainer.fit(job.module, datamodule=job.data, ckpt_path=str(resume_from) if resume_from else None)
        fitted = True
    except SIGTERMException as err:  # Lightning stopped on SIGTERM before a safe point of ours
        raise Interrupted(
            "SIGTERM received; Lightning stopped the run before a step boundary, so no new checkpoint was "
            f"saved; the newest complete one is {find_resumable(out / CHECKPOINTS)}; continue with resume=auto"
        ) from err
    except torch.OutOfMemoryError as err:
        raise OutOfMemory(_oom_message(job.tc, out, trainer)) from err
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = find_resumable(out / CHECKPOINTS)
        raise DiskFull(
            f"no space left on the device while writing ({err}); the newest complete checkpoint, "
            f"which resume=auto takes, is {last or 'none yet'}. Free space and run again with resume=auto"
        ) from err
    except Exception as err:
        # A collective that failed because another rank died (or hung past the process-group timeout):
        # one line naming it, not gloo's traceback (lit_lora.training.launcher).
        line = lost_rank(trainer, err, out / CHECKPOINTS) if trainer.world_size > 1 else None
        if line is None:
            raise
        raise RankLost(line) from err
    finally:
        # Nothing after fit is collective (scoring and the summary are rank zero's; the memory
        # tracker gathered every rank in on_train_end), so the process group ends here, on every
        # rank and also on failure, while the interpreter is fully alive. Left to Lightning, a gloo
        # group was destroyed only during interpreter finalization, with its threads running,
        # which could abort the process (issue 17; see lit_lora.training.distributed).
        end_process_group(completed=fitted, barrier=trainer.strategy.barrier)
        if (launcher := launcher_of(trainer)) is not None and launcher.watch is not None:
            launcher.watch.stop()  # how the ranks end from here is wait_for_launched_ranks' to check
    faults.signal_self_after("sigterm_after_fit", trainer.global_step)  # tests: a signal during scoring


def _summary(job: Job) -> dict:
    """The run's facts and training figures, as ``summary.json`` starts (see the module docstring)."""
    trainer, built, tc, module = job.trainer, job.built, job.tc, job.module
    summary: dict = {
        "status": "completed" if not trainer.interrupted else "interrupted",
        "model": built.source,
        "quant": tc.quant.method,
        "trainable_params": built.trainable_params,
        "total_params": built.total_params,
        "trainable_pct": round(built.trainable_pct, 4),
        "global_step": trainer.global_step,
        # Steps not taken: on_nonfinite=skip's, and the loss scaler's overflow skips (16-mixed).
        "skipped_steps": list(module.skipped_steps),
        "scaler_skipped_steps": module.scaler_skipped_steps,
        # lit-lora's own training paths this run used (the speed group; all off under speed=off).
        "speedups": {**dataclasses.asdict(built.speedups), "on": built.speedups.on},
        "data": job.data.stats,
    }
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary["final_train_loss"] = metrics.get("train/loss")
    summary["val_loss"] = metrics.get("val/loss")
    summary["val_ppl"] = metrics.get("val/ppl")
    summary["best_val_loss"] = module.best_val_loss
    if tc.objective.online:  # the last step's and the last validation's reward (GRPO)
        summary["final_reward"] = metrics.get("train/reward")
        summary["val_reward"] = metrics.get("val/reward")
        # rollout / log-probs without gradient / the loss forward (backward and optimizer step not included)
        summary["rollout_time_s"] = {k: round(v, 2) for k, v in module.grpo.seconds.items()}
    summary["objective"] = dataclasses.asdict(tc.objective)
    if tc.objective.preference:  # the last validation's preference figures (lit_lora.training.module)
        summary["preference"] = {
            key.removeprefix("val/"): value
            for key, value in metrics.items()
            if key.startswith("val/") and ("rewards_" in key or "logps_" in key)
        }
    return summary


def _score_held_out(job: Job, summary: dict) -> None:
    """Rank zero scores the test split (exact match; preference accuracy for pairs), with the adapter and,
    with ``score_base``, without it, into ``summary``; skipped for ``score=false`` or a sharded model."""
    import torch

    from lit_lora.inference.scoring import exact_match_score, preference_accuracy
    from lit_lora.training.strategies import scoring_device

    trainer, built, tc, data = job.trainer, job.built, job.tc, job.data
    # Lightning's teardown moved the model to the CPU; scoring runs where training ran (None: sharded).
    score_on = scoring_device(trainer.strategy) if tc.score else None
    if tc.score and score_on is None and trainer.is_global_zero:
        _say(
            f"held-out scoring skipped: under {tc.trainer.strategy} the model is sharded across ranks; "
            f"score it with lit-lora evaluate adapters=[{job.out / 'adapter'}]"
        )
    if score_on is None or not trainer.is_global_zero or not data.rows["test"] or tc.data.format == "text":
        return
    if data.prompts:
        _score_rewards(job, summary, score_on)
        return
    scoring_started = time.perf_counter()
    built.model.to(score_on)
    summary["score_device"] = str(score_on)
    args = (
        built.model,
        built.tokenizer,
        data.rendering,
        data.rows["test"],
        tc.data.score_max_new_tokens,
        tc.data.eval_batch_size,
    )
    # Frozen linears stored in bf16 (speed.bf16_frozen_linears) need the autocast they trained under.
    autocast = built.speedups.autocast_dtype
    with torch.autocast(score_on.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if tc.score_base:
            summary["score_base"] = exact_match_score(*args, use_adapter=False)
        summary["score_tuned"] = exact_match_score(*args, use_adapter=True)
        if data.pairs:  # which answer of each held-out pair the model itself finds more likely
            pairs = (
                built.model,
                built.tokenizer.pad_token_id,
                data.examples["test"],
                tc.data.eval_batch_size,
            )
            if tc.score_base:
                summary["preference_base"] = preference_accuracy(*pairs, use_adapter=False)
            summary["preference_tuned"] = preference_accuracy(*pairs, use_adapter=True)
    summary["score_wall_s"] = round(time.perf_counter() - scoring_started, 2)


def _score_rewards(job: Job, summary: dict, score_on) -> None:
    """GRPO's held-out score: greedy answers to the test prompts scored by the run's rewards, base and tuned."""
    import torch

    from lit_lora.rewards.held_out import reward_scores

    started = time.perf_counter()
    built, tc, data, grpo = job.built, job.tc, job.data, job.module.grpo
    built.model.to(score_on)
    summary["score_device"] = str(score_on)
    prompts = [e["input_ids"] for e in data.examples["test"]]
    args = (
        built.model,
        built.tokenizer,
        prompts,
        data.rows["test"],
        grpo.rewards,
        tc.objective.max_completion_length,
    )
    autocast = built.speedups.autocast_dtype
    with torch.autocast(score_on.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if tc.score_base:
            summary["reward_base"] = reward_scores(
                *args, tc.data.eval_batch_size, use_adapter=False, desc="held-out rewards (base)"
            )
        if tc.lora.init_from:  # the adapter training started from (an SFT warm-up): the "before" of RL
            summary["reward_init"] = _init_adapter_scores(built.model, tc.lora.init_from, args, tc)
        summary["reward_tuned"] = reward_scores(
            *args, tc.data.eval_batch_size, use_adapter=True, desc="held-out rewards (tuned)"
        )
    summary["rollout_time_s"] = {k: round(v, 2) for k, v in grpo.seconds.items()}
    summary["score_wall_s"] = round(time.perf_counter() - started, 2)


def _init_adapter_scores(model, folder: str, args: tuple, tc: TrainConfig) -> dict:
    """Held-out rewards of the adapter in ``folder`` (``lora.init_from``), loaded beside the trained one
    for the scoring and removed afterwards."""
    from lit_lora.models.adapters import load_named_adapter
    from lit_lora.rewards.held_out import reward_scores

    trained, name = model.active_adapter, "lit_lora_init"
    load_named_adapter(model, Path(folder), name)
    model.set_adapter(name)
    try:
        return reward_scores(
            *args, tc.data.eval_batch_size, use_adapter=True, desc="held-out rewards (start)"
        )
    finally:
        model.set_adapter(trained)
        model.delete_adapter(name)


def _finish(job: Job, summary: dict) -> None:
    """The callbacks' figures, peak memory and wall time into ``summary``; once every rank it started has
    ended well, rank zero writes ``summary.json`` and prints the report."""
    from lit_lora.training.distributed import wait_for_launched_ranks

    # Callback summaries last, so that memory peaks include held-out generation.
    for callback in job.callbacks:
        if hasattr(callback, "summary_metrics"):
            summary.update(callback.summary_metrics())
    summary["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    summary["wall_time_s"] = round(time.perf_counter() - job.started, 1)
    # Rank zero's exit status stands for the whole run (shell, sweep, SLURM): it covers the ranks it
    # started only if it outlives them and checks how they ended, before it reports completion.
    wait_for_launched_ranks(job.trainer)
    if job.trainer.is_global_zero:
        (job.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        _print_report(summary, job.out)


def _report_data(stats: dict, policy: str) -> None:
    examples = stats["examples"]
    _say(
        f"data: {stats['rows_read']} rows read; examples train {examples['train']}, val {examples['val']}, "
        f"test {examples['test']} (tokenized cache: {stats['cache']})"
    )
    if stats.get("packed_rows"):
        _say(f"packing: {examples['train']} examples in {stats['packed_rows']} rows")
    _say(
        f"truncated {stats['truncated']}, dropped with no trained token left {stats['dropped_no_trained_token']}, "
        f"padding {100 * stats['padding_fraction']:.1f}% of batch positions"
    )
    if stats["bad_rows"]:
        counts = ", ".join(f"{reason} {n}" for reason, n in stats["bad_rows"].items())
        _say(f"skipped bad rows (data.on_bad_row={policy}): {counts}")
    for reason, first in stats.get("first_of_each", {}).items():
        _say(f"  first {reason}: {first}")
    for note in stats.get("notes", []):
        _say(f"note: {note}")


def _print_report(summary: dict, out: Path) -> None:
    _say(f"run folder: {out}")
    _say(
        f"steps {summary['global_step']}, wall time {summary['wall_time_s']:.0f} s, "
        f"tokens/s {summary.get('tokens_per_s', 'n/a')}, peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    if summary.get("val_reward") is not None:
        _say(f"validation reward {summary['val_reward']:.4f} (greedy answers to the validation prompts)")
    elif summary.get("val_ppl") is not None:
        _say(f"validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.3f})")
    elif summary.get("val_loss") is not None:
        _say(f"validation loss {summary['val_loss']:.4f}")
    if summary.get("preference", {}).get("rewards_accuracy") is not None:
        pref = summary["preference"]
        _say(
            f"validation reward accuracy {100 * pref['rewards_accuracy']:.1f}%, reward margin "
            f"{pref['rewards_margin']:.4f} ({summary['objective']['name']})"
        )
    if "reward_tuned" in summary:
        _say_rewards(summary)
    if "score_tuned" in summary:
        _say_before_after(summary, "held-out exact match", "rows", "score", "exact_match")
        if "preference_tuned" in summary:
            title = "held-out pairs where the chosen answer is the more likely"
            _say_before_after(summary, title, "pairs", "preference", "accuracy")
    if summary.get("retention/kl") is not None:
        probe = summary["retention"]
        _say(
            f"retention ({probe['probes']} general prompts, adapter on vs off): agreement with the base "
            f"{100 * summary['retention/agreement']:.1f}%, KL {summary['retention/kl']:.3f}, NLL ratio "
            f"{summary['retention/nll_ratio']:.3f}"
        )
    if "score_tuned" in summary:
        for example in summary["score_tuned"]["examples"][:1]:
            _say(f"  example answer: {json.dumps(example['answer'])}")
            _say(f"  expected:       {json.dumps(example['reference'])}")


def _say_rewards(summary: dict) -> None:
    """GRPO's held-out lines: the weighted reward, then each function's mean (a share for 0/1 rewards),
    for the base (adapter off), the adapter training started from (``lora.init_from``) and the tuned one."""
    tuned = summary["reward_tuned"]
    stages = [
        (label, summary[key])
        for key, label in (("reward_base", "base"), ("reward_init", "start"))
        if key in summary
    ]
    stages.append(("tuned", tuned))
    line = " -> ".join(f"{label} {scores['total']:.3f}" for label, scores in stages)
    _say(f"held-out reward ({tuned['rows']} prompts, greedy): {line}")
    for name in tuned["per_function"]:
        share = all(scores.get("binary", {}).get(name) for _, scores in stages)
        parts = [
            f"{label} {_reward_value(scores['per_function'].get(name), share)}" for label, scores in stages
        ]
        _say(f"  {name}: " + " -> ".join(parts))


def _reward_value(x: float | None, share: bool) -> str:
    """A held-out reward mean; a pass/fail reward's mean is the share of passes, shown as a percentage."""
    return "n/a" if x is None else f"{100 * x:.1f}%" if share else f"{x:.3f}"


def _say_before_after(summary: dict, title: str, unit: str, prefix: str, key: str) -> None:
    """One line ``title (n unit): base x% -> fine-tuned y%`` from ``summary[prefix_base / prefix_tuned]``."""
    tuned = summary[f"{prefix}_tuned"]
    line = f"{title} ({tuned['n']} {unit}): "
    if f"{prefix}_base" in summary:
        line += f"base {summary[f'{prefix}_base'][key]:.1f}% -> "
    _say(line + f"fine-tuned {tuned[key]:.1f}%")


def run(overrides: Sequence[str] = ()) -> dict:
    """``lit-lora train <overrides>`` as a function (:mod:`lit_lora.config.compose`): the same config,
    checks and run folder; returns the summary written to ``summary.json``. A user mistake raises
    :class:`~lit_lora.errors.UserError` with the message the command line prints."""
    from lit_lora.config.compose import compose

    return train(compose("train", overrides)).summary


def task(cfg: DictConfig) -> float:
    """``lit-lora train``'s job on the composed config (:mod:`lit_lora.cli`); returns the best validation loss (the objective of sweepers such as Optuna).

    A single run ends a user mistake with one line on stderr and its exit status (2; 3 out of memory,
    4 disk full, 5 another rank died, 143 stopped by a signal with a checkpoint saved). Under ``-m`` a failed
    job is recorded (``failed.json``) and the sweep goes on (see :mod:`lit_lora.training.sweep`), except after
    a signal: that job keeps its checkpoint and the sweep ends with status 143.
    """
    from lit_lora.training.graceful import signal_received

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = train(cfg)
        if multirun and (signum := signal_received()) is not None:
            # After the job's last step boundary (held-out scoring, the summary): the job completed, and
            # the next one must not start into the kill.
            exit_with(
                Interrupted(
                    f"{signal.Signals(signum).name} received after this job's last step; the job completed "
                    "and the sweep stopped after it: the jobs after it did not start"
                )
            )
    except Interrupted as err:
        # The signal is meant for the process (a preempted node, a cancelled job): under -m the sweep
        # stops with this job's checkpoint saved, rather than starting the next job into the kill.
        if multirun:
            record_failure(cfg.output_dir, err)
            err = Interrupted(f"{err} (the sweep stopped at this job: the jobs after it did not start)")
        exit_with(err)
    except UserError as err:
        if not multirun:
            exit_with(err)
        print(f"lit-lora: error: {err}", file=sys.stderr, flush=True)
        record_failure(cfg.output_dir, err)
        return float("nan")
    except Exception as err:
        if not multirun:
            raise  # not a user mistake: the traceback is what a bug report needs
        log.exception("job failed")
        record_failure(cfg.output_dir, err)
        return float("nan")
    best = result.summary.get("best_val_loss")
    return float("nan") if best is None else best
