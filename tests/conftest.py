"""Shared fixtures: compose the real ``conf/`` with Hydra, exactly as ``python -m lit_lora.train`` does."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lit_lora.batching import MODEL_KEYS, collate
from lit_lora.config import LoraConfig, ModelConfig, QuantConfig, SpeedConfig, TrainConfig, register_configs
from lit_lora.rendering import Rendering, encode_conversation

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny, fast settings shared by tests that train the tiny random model.
TINY = [
    "model=tiny",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.precision=32",
    "data.train_size=32",
    "data.val_size=8",
    "data.test_size=4",
    "data.score_max_new_tokens=4",
]


# The same tiny runs with a preference objective: DPO on the built-in pairs (tests that must hold for
# every objective run with and without it).
# Plain DPO: the demo pair alone would add the NLL term (conf/objective_data/dpo_demo_preference.yaml).
DPO = ["objective=dpo", "data=demo_preference", "objective.rpo_alpha=0"]

# Runs whose numbers are compared across world sizes and resumes: fp32, no LoRA dropout, no validation.
EXACT = [*TINY, "lora.dropout=0.0", "score=false", "trainer.limit_val_batches=0"]
CKPT_EVERY_2 = [
    "callbacks.adapter_checkpoint.every_n_train_steps=2",
    "callbacks.adapter_checkpoint.monitor=null",
    "callbacks.adapter_checkpoint.save_top_k=-1",
]


def ddp(*overrides: str) -> tuple[str, ...]:
    """``overrides`` on two gloo CPU processes."""
    return ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *overrides)


def plain_config(
    model: ModelConfig | None = None, quant: QuantConfig | None = None, lora: LoraConfig | None = None
) -> TrainConfig:
    """A training config (default: the embedded SmolLM2) with every speed path off, so that
    ``build_model`` gives plain transformers + PEFT, for tests that put one path on themselves."""
    return TrainConfig(
        model=model or ModelConfig(name_or_path="embedded:smollm2-135m"),
        quant=quant or QuantConfig(),
        lora=lora or LoraConfig(),
        speed=SpeedConfig.off(),
    )


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer, the real one training uses (loaded once per session; a test that
    changes it restores it)."""
    from lit_lora.builder import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="embedded:smollm2-135m"), "embedded:smollm2-135m", True)


def compose_train(overrides: list[str]):
    """The composed ``train`` config for ``overrides`` (raises Hydra's errors as the CLI would)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="session", autouse=True)
def output_root(tmp_path_factory):
    """Runs in tests write under pytest's temporary root: make it the output root (lit_lora/paths.py), for
    this process and the training subprocesses it starts, so a test that writes elsewhere fails."""
    from lit_lora.paths import OUTPUT_ROOT_ENV

    root = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OUTPUT_ROOT_ENV, str(root))
        yield root


@pytest.fixture
def compose_cfg():
    return compose_train


def run_cli(
    *args: str, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m lit_lora.train`` in a subprocess (environment: ``env``, default this process's);
    returns the completed process (text output)."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lit_lora.train", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@dataclass(frozen=True)
class Run:
    """A finished CLI run: its folder and its completed process."""

    out: Path
    done: subprocess.CompletedProcess


# The two runs below are shared by the DDP tests (several files): starting a 2-process run costs ~15 s of
# imports and set-up alone on the CI machine, so each is paid once per session.
@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Run:
    """``EXACT`` for 4 steps in one process, micro-batch 8, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("reference")
    done = run_cli(*EXACT, *CKPT_EVERY_2, f"output_dir={out}", "data.batch_size=8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return Run(out, done)


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Run:
    """The same 4 steps on two gloo processes (micro-batch 4 each: the same global batch), through the real
    CLI, whose rank zero starts rank one; each rank reports the threads alive at its exit
    (:mod:`tests.exit_threads`)."""
    from tests.exit_threads import reporting_env

    out = tmp_path_factory.mktemp("ddp")
    env = reporting_env(tmp_path_factory.mktemp("site"))
    done = run_cli(
        *ddp(*EXACT, *CKPT_EVERY_2, f"output_dir={out}", "data.batch_size=4"), timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Run(out, done)


def alpaca_messages(row: dict) -> list[dict[str, str]]:
    """The conversation of an alpaca-style demo row (as :func:`lit_lora.rows.to_row` builds it)."""
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def demo_batch(tokenizer, rows: list[dict], max_len: int = 256) -> dict:
    """A padded batch of alpaca-style rows, rendered with the tokenizer's own template; model keys only."""
    rendering = Rendering.resolve(tokenizer)
    examples = []
    for row in rows:
        ids, labels = encode_conversation(tokenizer, rendering, alpaca_messages(row))
        examples.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    batch = collate(examples, tokenizer.pad_token_id)
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def train_with_accumulation(
    tmp_path: Path, overrides: list[str]
) -> dict[tuple[int, int], tuple[float, dict]]:
    """``{(micro, accum): (final train loss, adapter weights)}`` of three runs with the same global batch
    of 8: 8 x 1, 4 x 2 and 2 x 4 (``overrides`` make them exact: fp32, no dropout, no validation)."""
    from peft import get_peft_model_state_dict

    from lit_lora.train import train

    results = {}
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        result = train(
            compose_train(
                [
                    *overrides,
                    f"output_dir={tmp_path / f'{micro}x{accum}'}",
                    f"data.batch_size={micro}",
                    f"trainer.accumulate_grad_batches={accum}",
                ]
            )
        )
        weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(result.model).items()}
        results[(micro, accum)] = (result.summary["final_train_loss"], weights)
    return results


def assert_same_steps(results: dict[tuple[int, int], tuple[float, dict]], bound: float = 1e-5) -> None:
    """Every run of :func:`train_with_accumulation` ends with 8 x 1's loss and adapter, within ``bound``."""
    loss_ref, weights_ref = results[(8, 1)]
    assert any(w.abs().max() > 0 for k, w in weights_ref.items() if "lora_B" in k), "B must have moved"
    for key, (loss, weights) in results.items():
        assert abs(loss - loss_ref) < bound, (key, loss, loss_ref)
        assert max((weights[k] - weights_ref[k]).abs().max().item() for k in weights_ref) < bound, key
