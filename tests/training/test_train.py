"""End to end: train(cfg) writes the run folder; the saved adapter reproduces the model in a new process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_lora.data.demo import make_rows
from lit_lora.errors import UserError
from lit_lora.training.run import train
from tests.helpers import ROOT, TINY, compose_train, demo_batch


def test_tiny_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = train(compose_train([*TINY, f"output_dir={out}"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert summary["score_device"] == "cpu", "scored where it trained"
    assert summary["trainable_params"] > 0 and summary["trainable_params"] < summary["total_params"]
    assert {"score_base", "score_tuned", "val_loss", "tokens_per_s", "wall_time_s", "peak_rss_mb"} <= set(
        summary
    )
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "rendering.json"):
        assert (out / "adapter" / name).is_file(), name
    assert not list((out / "adapter").glob("*.bin")), "weights are written as safetensors only"
    assert (out / "config.yaml").is_file() and (out / "data" / "train.jsonl").is_file()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].count("train/loss") == 1 and len(rows) > 2


def test_existing_run_folder_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="exists from an earlier run"):
        train(compose_train([*TINY, f"output_dir={out}"]))
    assert (out / "adapter" / "mine.txt").read_text() == "keep"


def test_issue_command_without_hub_fails_fast_with_clear_message(cli, tmp_path):
    started = time.perf_counter()
    proc = cli("model=mistral7b", "quant=nf4", "lora.r=64", f"output_dir={tmp_path}", timeout=120)
    elapsed = time.perf_counter() - started
    if "cannot be reached" not in proc.stderr:
        pytest.skip("the hub is reachable from this machine")
    assert proc.returncode != 0
    # Loose: a connection that waits for the network's own timeout takes minutes; imports alone have taken
    # 30 s on this machine under two busy test workers.
    assert elapsed < 60, elapsed
    assert "mistralai/Mistral-7B-v0.1" in proc.stderr and "model.name_or_path=" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_gpt2_article_targets_name_c_attn(cli, tmp_path):
    proc = cli("model=gpt2", "lora.target_modules=[q_proj,v_proj]", f"output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "c_attn" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_real_model_adapter_reproduces_logits_through_plain_peft(tmp_path):
    """Two steps on the embedded SmolLM2 in fp32, then PeftModel.from_pretrained in a new process. Two
    steps, not one, so that an adapter saved after the first step (not the last) would show; micro-batches
    of 2 rows: what is checked is the saved adapter, not what it learnt."""
    out = tmp_path / "run"
    result = train(
        compose_train(
            [
                f"output_dir={out}",
                "model.dtype=float32",
                "trainer.precision=32",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.enable_progress_bar=false",
                "optim.lr=1e-2",
                "optim.warmup_steps=0",
                "data.train_size=4",
                "data.val_size=2",
                "data.test_size=2",
                "data.batch_size=2",
                "score=false",  # the logits are the check here: no held-out scoring, no retention probe
                "callbacks.retention.enabled=false",
            ]
        )
    )
    model = result.model.eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "training must move LoRA B off zero"
    rows = make_rows(3, seed=99, held_out_names=True)
    batch = demo_batch(result.tokenizer, rows)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter must change the logits"
    save_file({k: batch[k] for k in ("input_ids", "attention_mask")}, str(tmp_path / "inputs.safetensors"))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "reload_adapter.py"),
            result.summary["model"],
            str(out / "adapter"),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "logits.safetensors"),
        ],
        check=True,
        timeout=300,
    )
    reloaded = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert (reloaded - expected).abs().max().item() <= 1e-5
    assert json.loads((out / "adapter" / "rendering.json").read_text())["format"] == "alpaca"


@pytest.mark.slow
@pytest.mark.bnb
def test_real_model_qlora_nf4_trains_on_cpu(tmp_path):
    """Two steps and a validation on the NF4-quantized embedded SmolLM2, in micro-batches of 2 rows (the
    quantized path is the check, not what the adapter learns)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    result = train(
        compose_train(
            [
                f"output_dir={out}",
                "quant=nf4",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.enable_progress_bar=false",
                "data.train_size=4",
                "data.val_size=2",
                "data.test_size=2",
                "data.batch_size=2",
                "score=false",
            ]
        )
    )
    assert result.summary["quant"] == "nf4" and result.summary["global_step"] == 2
    assert any(type(p).__name__ == "Params4bit" for p in result.model.parameters())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_logger_none_trains_without_the_learning_rate_monitor(tmp_path):
    """logger=none with the default callbacks: Lightning's LearningRateMonitor would refuse the Trainer."""
    result = train(
        compose_train([*TINY, "logger=none", "trainer.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    )
    assert result.summary["global_step"] == 2
    assert not (tmp_path / "run" / "metrics.csv").exists()
