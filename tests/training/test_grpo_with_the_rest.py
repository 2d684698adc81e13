"""GRPO with everything else (issue 35, point 8): a QLoRA base, a Hydra sweep, W&B, and the commands that
follow training (merge, generate, evaluate, export, serve) on a GRPO adapter.

Every test is a real run of the tiny random Llama with the test rewards of :mod:`tests.training.test_grpo`
(``GRPO``), with the export tests' 512-token vocabulary (``small_vocab``): every reader of a GGUF file
parses the whole vocabulary (seconds for SmolLM2's 49,152 tokens), and decoding is cheaper. The commands
after training share one GRPO run; the sweep is also the W&B run (one subprocess pays both start-ups).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lit_lora.apps import evaluate as evaluate_command
from lit_lora.apps import generate as generate_command
from lit_lora.apps import merge as merge_command
from lit_lora.export import exporter as export_command
from lit_lora.models.embedded import cache_root
from lit_lora.training.run import train
from tests.export import test_export
from tests.helpers import TINY, compose_train
from tests.serve.test_serve import KEY, ask, start_server
from tests.training.test_grpo import GRPO
from tests.training.test_sweep import multirun

pytestmark = pytest.mark.slow

small_vocab = test_export.small_vocab  # the export tests' fixture (a 512-token BPE), shared by name

SMALL_SPLITS = ["data.train_size=8", "data.val_size=4", "data.test_size=2"]
# Two GRPO steps of 2 prompts x 2 completions, without the held-out scores or validation.
SHORT = [
    "trainer.max_steps=2",
    "data.batch_size=4",
    *SMALL_SPLITS,
    "score=false",
    "trainer.limit_val_batches=0",
]
PROMPT = (
    'Extract the person record from the sentence as one line of JSON with the keys "name", "age" '
    '(a number), "job" and "city", and nothing else.\n\nAnna Berg is a 34-year-old nurse from Oslo.'
)
QUOTED = f"'{PROMPT}'"  # the prompt as one Hydra override value (it holds quotes, commas, parentheses)
MAX_SEQ_LEN = 200
TABLE_COLUMNS = ["step", "prompt", "completion", "reward", "advantage"]


@pytest.fixture(scope="module")
def tiny_grpo(small_vocab) -> list[str]:
    """``SHORT`` GRPO runs of the tiny model with the 512-token vocabulary, whose prompts are longer
    in tokens than SmolLM2's (up to 158): a longer ``data.max_seq_len`` keeps them whole."""
    return [*TINY, *small_vocab, *GRPO, *SHORT, f"data.max_seq_len={MAX_SEQ_LEN}"]


def _lora_b(adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}


# ------------------------------------------------------------------------------------- QLoRA
def test_a_qlora_grpo_run_trains_every_lora_layer(tiny_grpo, tmp_path):
    """nf4 base (fp32 compute, as the QLoRA export test): the rollouts decode on the 4-bit training weights,
    then the update backpropagates through them to every LoRA layer (B starts at zero: each must move)."""
    out = tmp_path / "run"
    result = train(
        compose_train([*tiny_grpo, "quant=nf4", "quant.compute_dtype=float32", f"output_dir={out}"])
    )
    summary = result.summary
    assert summary["status"] == "completed" and summary["global_step"] == 2
    assert summary["quant"] == "nf4"
    lora_b = _lora_b(out / "adapter")
    assert len(lora_b) == 8  # q, k, v, o of the 2 layers
    still_zero = sorted(k for k, v in lora_b.items() if v.abs().max() == 0)
    assert not still_zero, f"no gradient reached these LoRA layers through the 4-bit base: {still_zero}"


# ------------------------------------------------------------------------------------- sweep and W&B
@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory, tiny_grpo) -> tuple[Path, subprocess.CompletedProcess]:
    """``lit-lora train -m objective.beta=0,0.04 logger=wandb``: two GRPO jobs, each an offline W&B run
    logging the completions table at every step."""
    home = tmp_path_factory.mktemp("home")
    sweep = tmp_path_factory.mktemp("grpo-sweep") / "s"
    env = {k: "" for k in os.environ if k.startswith("WANDB_")} | {"WANDB_API_KEY": "", "HOME": str(home)}
    env["LIT_LORA_CACHE"] = str(cache_root())  # not a new, empty cache under the new HOME
    done = multirun(
        sweep,
        *tiny_grpo,
        "objective.log_completions_every=1",
        "logger=wandb",
        "objective.beta=0,0.04",
        env=env,
    )
    return sweep, done


def _jobs_by_beta(sweep: Path) -> dict[float, Path]:
    """The sweep's job folders by the ``objective.beta`` of their saved config."""
    jobs = [p for p in sweep.iterdir() if (p / "config.yaml").is_file()]
    return {float(OmegaConf.load(job / "config.yaml").objective.beta): job for job in jobs}


def test_a_beta_sweep_completes_both_jobs_and_only_beta_above_zero_logs_the_kl(beta_sweep):
    sweep, done = beta_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of 2 jobs completed" in done.stdout
    jobs = _jobs_by_beta(sweep)
    assert set(jobs) == {0.0, 0.04}
    for job in jobs.values():
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 2
        assert (job / "adapter" / "adapter_model.safetensors").is_file()
    header = {
        beta: (job / "metrics.csv").read_text().splitlines()[0].split(",") for beta, job in jobs.items()
    }
    assert "train/kl" in header[0.04], header[0.04]
    assert "train/kl" not in header[0.0], "beta=0: no reference forward, no KL"
    assert all("train/reward" in h for h in header.values())


def _inspect(run_dir: Path, *args: str) -> str:
    """``wandb leet inspect --json <args>`` of an offline run: what W&B itself reads back."""
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    done = subprocess.run(
        [wandb_cli, "leet", "inspect", "--json", *args, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_offline_wandb_run_holds_the_rewards_and_the_completions_table(beta_sweep):
    sweep, done = beta_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    job = _jobs_by_beta(sweep)[0.04]
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    record = json.loads(_inspect(run_dir, "--summary"))
    assert record["state"] == "finished" and isinstance(record["summary"]["train/reward"], int | float)
    lines = [json.loads(line) for line in _inspect(run_dir).splitlines() if '"type":"history"' in line]
    history = [line["history"]["item"] for line in lines]
    rewards = [item["train/reward"] for item in history if "train/reward" in item]
    assert len(rewards) == 2 and all(isinstance(r, int | float) for r in rewards), "one point per step"
    assert any("rewards/even" in item for item in history) and any("train/kl" in item for item in history)

    tables = [item for item in history if item.get("completions._type") == "table-file"]
    assert len(tables) == 2, "objective.log_completions_every=1: a table at each of the 2 steps"
    written = [json.loads(line) for line in (job / "completions.jsonl").read_text().splitlines()]
    for item in tables:
        table = json.loads((run_dir / "files" / item["completions.path"]).read_text())
        assert table["columns"] == TABLE_COLUMNS
        assert len(table["data"]) == item["completions.nrows"] == 2, "one group of G=2 completions"
        (step,) = {row[0] for row in table["data"]}
        # The table holds what completions.jsonl holds for that step.
        assert [row[2] for row in table["data"]] == [w["completion"] for w in written if w["step"] == step]
        assert all(row[1].startswith("Extract the person record") for row in table["data"])


# ------------------------------------------------------------------------------------- after training
@pytest.fixture(scope="module")
def models(small_vocab) -> list[str]:
    """The model overrides of the run below, for the commands after training (as in the export tests)."""
    return [*small_vocab, "pre_tokenizer=gpt-2"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_grpo) -> Path:
    """One tiny GRPO run (512-token vocabulary) shared by the commands after training; its run folder."""
    run = tmp_path_factory.mktemp("grpo-apps") / "run"
    # A large learning rate: the adapter moves the logits well beyond round-off after 2 steps.
    result = train(compose_train([*tiny_grpo, "optim.lr=1e-2", f"output_dir={run}"]))
    assert result.summary["status"] == "completed"
    assert all(v.abs().max() > 0 for v in _lora_b(run / "adapter").values()), "trained: B is not zero"
    return run


def _model_only(models: list[str]) -> list[str]:
    """The overrides of ``models`` that generate, merge and serve take (no pre_tokenizer)."""
    return [o for o in models if o.startswith("model")]


def test_merge_then_generate_from_the_merged_folder(grpo_run, models, tmp_path):
    adapter = grpo_run / "adapter"
    out = merge_command.run([*_model_only(models), f"adapter={adapter}", f"output_dir={tmp_path / 'merged'}"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "rendering.json"} <= {
        p.name for p in out.iterdir()
    }
    # The merged weights are plain PEFT's merge of the adapter into the base the run trained on.
    base_dir = json.loads((grpo_run / "summary.json").read_text())["model"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    name = "model.layers.0.self_attn.q_proj.weight"
    plain = base.state_dict()[name].clone()
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    merged = load_file(str(out / "model.safetensors"))
    assert (merged[name] - plain).abs().max() > 1e-4, "the adapter is in the merged weights"
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) < 1e-6

    one = [f"prompt={QUOTED}", "max_new_tokens=8", "stream=false"]
    from_merged = generate_command.run([f"model.name_or_path={out}", "model.dtype=float32", *one])
    with_adapter = generate_command.run([*_model_only(models), f"adapter={adapter}", *one])
    assert from_merged.new_tokens > 0
    assert from_merged == with_adapter, "the merged folder answers as the base plus the adapter"


def test_evaluate_scores_the_grpo_adapter_on_reference_answers(grpo_run, models, tmp_path):
    """``data=demo``: the run's task with the reference answer of each prompt."""
    overrides = [*_model_only(models), "data=demo", *SMALL_SPLITS, "data.score_max_new_tokens=4"]
    report = evaluate_command.run(
        [*overrides, f"adapters=[{grpo_run / 'adapter'}]", f"work_dir={tmp_path / 'evaluation'}"]
    )
    assert [m["model"] for m in report["models"]] == ["base", str(grpo_run / "adapter")]
    for entry in report["models"]:
        assert math.isfinite(entry["perplexity"]) and {"exact_match", "f1", "rouge_l"} <= set(entry)
    assert report["models"][0]["perplexity"] != report["models"][1]["perplexity"]


def test_evaluate_on_the_runs_own_prompt_data(grpo_run, models, tmp_path):
    """``data=demo_prompt``, the data the run trained on: prompts without a reference answer."""
    overrides = [
        *_model_only(models),
        "data=demo_prompt",
        f"data.max_seq_len={MAX_SEQ_LEN}",
        *SMALL_SPLITS,
        "data.score_max_new_tokens=4",
    ]
    report = evaluate_command.run(
        [*overrides, f"adapters=[{grpo_run / 'adapter'}]", f"work_dir={tmp_path / 'evaluation'}"]
    )
    assert [m["model"] for m in report["models"]] == ["base", str(grpo_run / "adapter")]
    for entry in report["models"]:
        numbers = {k: v for k, v in entry.items() if isinstance(v, float)}
        assert numbers and all(math.isfinite(v) for v in numbers.values()), entry
        # No answer to measure perplexity on; the run's own rewards (its config.yaml) score the answers,
        # and the demo's answer column gives the task metrics.
        assert "perplexity" not in entry and "exact_match" in entry
        assert math.isfinite(entry["reward"]) and set(entry["rewards"]) >= {"exact_match", "even"}


def test_export_to_gguf_without_the_gate_reads_back(grpo_run, models, tmp_path):
    out = tmp_path / "export"
    overrides = ["outtype=f32", "modelfile=false", "gate=false", f"output_dir={out}"]
    report = export_command.run([*models, f"adapter={grpo_run / 'adapter'}", *overrides])
    assert report["architecture"] == "llama" and report["tensor_types"] == {"F32": 20}
    reader = gguf.GGUFReader(str(out / "model-f32.gguf"))
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight", "token_embd.weight"}


def test_export_to_gguf_passes_the_parity_gate_on_the_runs_held_out_prompts(grpo_run, models):
    """The default export of a run's adapter: the gate compares the file with the trained model on the
    run's own held-out rows (here prompts without answers)."""
    report = export_command.run(
        [*models, f"adapter={grpo_run / 'adapter'}", "outtype=f32", "modelfile=false"]
    )
    gate = report["gate"]
    assert gate["passed"] and gate["max_abs_logit_diff"] <= 1e-4, gate


def test_serve_answers_one_request_as_generate_does(grpo_run, models):
    adapter = grpo_run / "adapter"
    proc, port = start_server(*_model_only(models), f"adapters=[grpo={adapter}]", f"api_key={KEY}")
    try:
        answer = ask(port, "grpo", PROMPT, max_tokens=8)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    expected = generate_command.run(
        [*_model_only(models), f"adapter={adapter}", f"prompt={QUOTED}", "max_new_tokens=8", "stream=false"]
    )
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == expected.new_tokens
    assert proc.returncode == 0, "".join(proc.stderr_lines)[-3000:]
