"""GRPO in the training loop (issue 35): config refusals, a whole run's outputs, and that scaling and resuming
do not change the numbers.

The runs train the tiny random Llama on the RL demo's prompts (``data=demo_prompt``) with its rewards
(exact match and fields matched against the ``answer`` column). The tiny model answers garbage and never
ends early, so those rewards are 0 and the test runs add :func:`even_token_share` (a reward plugin of
this module), whose value differs within a group: the advantages are non-zero and the steps train. Numbers are compared in fp32 without LoRA
dropout (``EXACT``), except the kill-and-resume test, which keeps dropout to show that its random stream
resumes too.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_lora.config.schema import to_train_config
from lit_lora.errors import UserError
from lit_lora.training.run import train
from tests.helpers import (
    EXACT,
    TINY,
    assert_same_steps,
    compose_train,
    ddp,
    run_cli,
    train_with_accumulation,
)

GRPO = [
    "objective=grpo",
    "data=demo_prompt",
    "objective.num_generations=2",
    "objective.max_completion_length=6",
    "objective.temperature=1.0",
    "+rewards.length._target_=lit_lora.rewards.length_penalty.length_penalty",
    "+rewards.length.max_tokens=6",
    "+rewards.length.weight=0.3",
    "+rewards.even._target_=tests.training.test_grpo.even_token_share",
]
GRPO_EXACT = [*EXACT, *GRPO, "data.train_size=32"]


def even_token_share(prompts, completions, completion_ids, **columns) -> list[float]:
    """A test reward with TRL's signature: the share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _completions(run: Path) -> dict[int, list[dict]]:
    """completions.jsonl by step; a resumed run rewrites the steps after its checkpoint: the last wins."""
    by_step: dict[int, list[dict]] = {}
    for line in (run / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], [])
        if len(by_step[row["step"]]) == 2:  # G = 2: a second write of that step's group
            by_step[row["step"]] = []
        by_step[row["step"]].append(row)
    return by_step


# ------------------------------------------------------------------------------------- config refusals
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["objective=grpo", "data=demo"], "set data.format=prompt"),
        (["data=demo_prompt"], "data.format=prompt holds prompts without answers: it needs objective=grpo"),
        ([*GRPO[:2], "objective.num_generations=1"], "objective.num_generations must be >= 2"),
        (
            [*GRPO[:2], "objective.num_generations=3"],
            "data.batch_size=16 counts completions and must be a multiple",
        ),
        ([*GRPO[:2], "objective.max_completion_length=200"], "leaves no room for the prompt"),
        ([*GRPO[:2], "objective.loss_type=ppo"], "objective.loss_type='ppo' is not supported"),
        ([*GRPO[:2], "objective.scale_rewards=rank"], "objective.scale_rewards='rank' is not supported"),
        ([*GRPO[:2], "objective.temperature=0"], "objective.temperature must be > 0"),
        ([*GRPO[:2], "rewards.exact_match._target_=no.such.module.fn"], "rewards.exact_match._target_"),
        ([*GRPO[:2], "rewards.exact_match._target_=math.sqrt"], "rewards.exact_match"),
        ([*GRPO[:2], "rewards=null"], "objective=grpo needs at least one reward function"),
        ([*GRPO[:2], "data.packing=true"], "data.packing=true does not apply to objective=grpo"),
    ],
)
def test_impossible_grpo_settings_fail_at_config_time_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_train_config(compose_train([*overrides, "model=tiny", f"output_dir={tmp_path}"]))


def test_a_reward_that_cannot_be_imported_stops_the_command_before_any_weight_loads(tmp_path):
    done = run_cli(
        "objective=grpo",
        "data=demo_prompt",
        "rewards.exact_match._target_=my_rewards.nope",
        f"output_dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rewards.exact_match._target_" in lines[0], done.stderr
    assert "Loading weights" not in done.stdout + done.stderr
    assert not (tmp_path / "run" / "adapter").exists()


# ------------------------------------------------------------------------------------- a whole run
@pytest.mark.slow
def test_a_grpo_run_logs_rewards_and_completions_and_scores_the_held_out_prompts(tmp_path):
    out = tmp_path / "run"
    result = train(
        compose_train(
            [
                *TINY,
                *GRPO,
                "trainer.max_steps=4",
                "trainer.val_check_interval=2",
                "data.val_size=4",
                "data.batch_size=4",
                "objective.log_completions_every=2",
                f"output_dir={out}",
            ]
        )
    )
    summary = result.summary
    assert summary["status"] == "completed" and summary["global_step"] == 4
    for key in ("reward_base", "reward_tuned"):
        score = summary[key]
        names = {"exact_match", "fields_matched", "length", "even"}
        assert score["rows"] == 4 and set(score["per_function"]) == names
        assert -1.0 <= score["per_function"]["length"] <= 0.0
    assert summary["val_reward"] is not None and summary["final_reward"] is not None
    assert set(summary["rollout_time_s"]) == {"rollout", "logps", "update"}
    times = summary["rollout_time_s"]
    assert times["rollout"] > 0 and times["update"] > 0
    assert times["logps"] == 0, "num_iterations 1 and beta 0: no log-prob pass besides the update's"
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in (
        "train/reward",
        "train/reward_std",
        "rewards/exact_match",
        "rewards/length",
        "train/completion_length",
        "train/completion_length_max",
        "train/truncated_share",
        "train/frac_reward_zero_std",
        "train/clip_ratio/region",
        "val/reward",
        "perf/samples_per_s",
    ):
        assert column in header, column
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2} and len(samples) == 4  # one group of G=2 per logged step
    for sample in samples:
        assert sample["prompt"].startswith("Extract the person record")
        assert set(sample["rewards"]) == {"exact_match", "fields_matched", "length", "even"}
        assert isinstance(sample["completion"], str) and sample["advantage"] is not None


# ------------------------------------------------------------------------------------- same numbers
@pytest.mark.slow
def test_gradient_accumulation_8x1_4x2_2x4_trains_the_same_adapter(tmp_path):
    """The round's prompts decode together at its first micro-batch, whatever the split, and DAPO (the
    default loss) divides by the whole step's completion tokens: accumulation changes nothing. (The
    per-completion means of grpo / bnpo / dr_grpo are divided by the accumulation like an SFT mean.)"""
    overrides = [*GRPO_EXACT, "trainer.max_steps=2"]
    assert_same_steps(train_with_accumulation(tmp_path, overrides))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    """Each rank decodes its own prompts with seeds from (run seed, step, prompt): the same completions as
    one process; the groups stay whole on a rank, DAPO's token count is summed over the ranks."""
    common = [*GRPO_EXACT, "trainer.max_steps=3"]
    single = train(compose_train([*common, f"output_dir={tmp_path / 'single'}", "data.batch_size=8"]))
    assert single.summary["status"] == "completed"
    done = run_cli(*ddp(*common, f"output_dir={tmp_path / 'ddp'}", "data.batch_size=4"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 devices" in done.stdout
    assert _max_diff(_adapter(tmp_path / "ddp"), _adapter(tmp_path / "single")) < 1e-6
    moved = _adapter(tmp_path / "single")
    assert any(v.abs().max() > 0 for k, v in moved.items() if "lora_B" in k), "the adapter must have trained"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_auto_ends_bitwise_equal_completions_included(tmp_path):
    """Two optimizer steps per round (num_iterations=2) and a checkpoint every step, so a checkpoint can
    fall between the two iterations of a round: its rollouts come back from the checkpoint."""
    common = [
        *TINY,
        *GRPO,
        "score=false",
        "trainer.limit_val_batches=0",
        "lora.dropout=0.1",
        "trainer.max_steps=8",
        "data.batch_size=4",
        "objective.num_iterations=2",
        "objective.log_completions_every=1",
        "callbacks.adapter_checkpoint.every_n_train_steps=1",
        "callbacks.adapter_checkpoint.monitor=null",
        "callbacks.adapter_checkpoint.save_top_k=-1",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_cli(*common, f"output_dir={whole}", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    step = random.randint(1, 7)
    print(f"SIGKILL after step {step}")  # a failing step can be replayed
    # LIT_LORA_FAULTS=sigkill@N: the process kills itself after step N's hooks (its checkpoint written),
    # at an odd step between the two iterations of a round, at an even one between two rounds.
    killed_run = run_cli(
        *common,
        f"output_dir={killed}",
        "resume=auto",
        timeout=300,
        env={**os.environ, "LIT_LORA_FAULTS": f"sigkill@{step}"},
    )
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr[-2000:]
    assert not (killed / "adapter").exists()
    final = run_cli(*common, f"output_dir={killed}", "resume=auto", timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    a, b = _adapter(whole), _adapter(killed)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "adapter differs from the uninterrupted run"
    assert _completions(killed) == _completions(whole), "the resumed run drew other completions"


def test_the_starting_adapter_is_scored_beside_the_trained_one_and_removed_after(tmp_path, tokenizer):
    """``lora.init_from`` (an SFT warm-up before GRPO): the held-out "start" score is that adapter's, the
    trained adapter stays active and untouched, and nothing of the start adapter is left on the model."""
    from lit_lora.config.schema import TrainConfig
    from lit_lora.data.rows import Row
    from lit_lora.rewards.loading import load_rewards
    from lit_lora.training.run import _init_adapter_scores
    from tests.helpers import tiny_lora_model

    model = tiny_lora_model(r=4, dropout=0.0)
    model.save_pretrained(str(tmp_path / "start"))  # the start adapter: these weights
    with torch.no_grad():  # then the trained adapter moves away from it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}
    rows = [
        Row(f"t:{i}", messages=[{"role": "user", "content": "hi"}], prompt="hi", columns={}) for i in range(3)
    ]
    prompts = [[1, 5 + i, 7] for i in range(3)]
    rewards = load_rewards({"even": {"_target_": "tests.training.test_grpo.even_token_share"}})
    tc = TrainConfig()
    tc.data.eval_batch_size = 2
    args = (model, tokenizer, prompts, rows, rewards, 4)
    start = _init_adapter_scores(model, str(tmp_path / "start"), args, tc)
    assert start["rows"] == 3 and start["per_function"]["even"] is not None
    assert model.active_adapter == "default" and set(model.peft_config) == {"default"}
    now = {k: v for k, v in model.state_dict().items() if "lora" in k}
    assert now.keys() == trained.keys() and all(torch.equal(now[k], trained[k]) for k in now)
