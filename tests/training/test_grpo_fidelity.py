"""GRPO's math against TRL's ``GRPOTrainer`` (trl is a test-only reference implementation here).

TRL's own code runs on the same fixed prompts, completions and rewards: ``_generate_and_score_completions``
with only its generation step (``_generate``) replaced by one that returns the fixed token ids, so that
TRL tokenises nothing, pads, scores with its reward functions, computes the advantages and (when its
settings ask for them) the old and reference log-probs itself; then ``_compute_loss`` on that output.
lit-lora's side is :func:`completion_batch` + :func:`completion_logps` (chunked and full-logits paths)
+ :func:`group_advantages` + :func:`grpo_loss`. Both run the tiny random Llama in fp32 with the same LoRA
(dropout 0, non-zero B weights), TRL on a deep copy of lit-lora's model, and the losses, the gradients of
every LoRA weight and TRL's metrics (clip fractions, KL) must agree within 1e-5.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from lit_lora.config.schema import LoraConfig
from lit_lora.models.builder import build_model
from lit_lora.training.completions import completion_batch, completion_logps
from lit_lora.training.grpo import group_advantages, grpo_loss, masked_mean, nanstd
from tests.helpers import plain_config, tiny_model_config

G = 3  # completions per prompt
# Three prompts of different lengths, each with G completions of different lengths (adjacent, as TRL
# orders them); token ids drawn with a fixed seed, some completions ending with the EOS token (2).
_ids = torch.Generator().manual_seed(1)


def _tokens(n: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=_ids).tolist()


PROMPTS = [_tokens(3), _tokens(6), _tokens(9)]
COMPLETIONS = [
    _tokens(4),
    [*_tokens(6), 2],
    _tokens(2),
    [*_tokens(4), 2],
    _tokens(1),
    _tokens(8),
    _tokens(5),
    [*_tokens(2), 2],
    _tokens(7),
]
ROWS = [p for p in PROMPTS for _ in range(G)]  # each completion's prompt
MAX_COMPLETION_LENGTH = 16  # dr_grpo's constant divisor (every completion is shorter)

# Advantage fixture: two reward functions (weights 1 and 0.5), None (NaN) where a function abstains:
# group 0 mixes a None with a number, group 1 ties (0.5 each, one through the second function only),
# row 6 is unscorable (both None), so group 2 has two scorable completions.
REWARD_WEIGHTS = [1.0, 0.5]
REWARDS_A = [1.0, 0.0, 0.5, 0.5, 0.5, None, None, 2.0, -1.0]
REWARDS_B = [0.0, 1.0, None, 0.0, 0.0, 1.0, None, 0.0, 1.0]
# Loss fixture: one reward function, no ties, so that every group has advantages of both signs.
REWARDS_LOSS = [1.0, 0.0, 0.6, 0.2, 0.9, -0.3, 0.4, 2.0, -1.0]
# num_iterations 2: the old policy's log-probs are the current ones minus this per-token offset (a row
# offset plus noise), so that the ratios exp(offset) leave [1 - eps, 1 + eps] on both sides.
OFFSETS = [0.3, -0.3, 0.05, -0.3, 0.3, 0.3, -0.05, 0.3, -0.3]


@pytest.fixture(scope="module")
def tiny():
    """The tiny Llama (fp32) with a LoRA (r 4, dropout 0) whose B weights are non-zero (seeded)."""
    torch.manual_seed(0)
    built = build_model(plain_config(model=tiny_model_config(), lora=LoraConfig(r=4, dropout=0.0)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    built.model.train()
    assert next(built.model.parameters()).dtype == torch.float32
    return SimpleNamespace(model=built.model, tokenizer=built.tokenizer)


def _reward_func(name: str, values: list[float | None]):
    def reward(completions, **kwargs):
        assert len(completions) == len(values)
        return list(values)

    reward.__name__ = name
    return reward


def _trl(tiny, tmp_path, rewards: list[list[float | None]], weights: list[float] | None = None, **config):
    """TRL's GRPOTrainer on a deep copy of the model; its generation returns the fixed completions."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(COMPLETIONS),
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        reward_weights=weights,
        use_cpu=True,
        bf16=False,
        report_to=[],
        **config,
    )
    model = copy.deepcopy(tiny.model)
    model.zero_grad(set_to_none=True)  # a deep copy would carry gradients left by a failed test
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[_reward_func(f"r{k}", values) for k, values in enumerate(rewards)],
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "x"}] * len(COMPLETIONS)),
        processing_class=tiny.tokenizer,
    )
    # With beta > 0, TRL makes a frozen copy ("ref") of an adapter the model already has, as the reference
    # of a run that continues it; lit-lora's reference is the base model (adapter off), which is what TRL
    # uses for an adapter it creates itself (use_adapter(model, None) disables the adapters).
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    model.train()
    # Set by Trainer's training loop (the micro-batches of the step): 1, no accumulation.
    trainer.current_gradient_accumulation_steps = 1
    texts = tiny.tokenizer.batch_decode(COMPLETIONS, skip_special_tokens=True)

    def fixed_generate(prompts):  # TRL's generation replaced by the fixed prompt and completion ids
        assert len(prompts) == len(COMPLETIONS)
        return [list(p) for p in ROWS], [list(c) for c in COMPLETIONS], None, texts, None, {}, None, []

    trainer._generate = fixed_generate
    return trainer


def _scored(trainer) -> dict:
    """TRL's inputs for ``_compute_loss``: its own padding, rewards, advantages (and old / reference
    log-probs where its settings compute them) for the fixed completions."""
    return trainer._generate_and_score_completions([{"prompt": "x"} for _ in COMPLETIONS])


def _rewards_per_func(rewards: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor([[math.nan if r is None else r for r in column] for column in rewards]).T


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ------------------------------------------------------------------------------------------ advantages
def test_nanstd_equals_trl():
    from trl.trainer.utils import nanstd as trl_nanstd

    x = torch.tensor([[1.0, math.nan, 3.0, 0.5], [math.nan, math.nan, 2.0, math.nan], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(nanstd(x), trl_nanstd(x), equal_nan=True)
    torch.testing.assert_close(nanstd(x, dim=1).reshape(-1), trl_nanstd(x, dim=1), equal_nan=True)
    assert torch.isnan(nanstd(x, dim=1)[1]).all(), "one value: no deviation"


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(tiny, tmp_path, scale_rewards):
    rewards = [REWARDS_A, REWARDS_B]
    trainer = _trl(tiny, tmp_path, rewards, REWARD_WEIGHTS, scale_rewards=scale_rewards)
    theirs = _scored(trainer)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    ours = group_advantages(_rewards_per_func(rewards), torch.tensor(REWARD_WEIGHTS), G, scale_rewards)

    torch.testing.assert_close(ours.advantages, theirs["advantages"], atol=1e-6, rtol=0)
    assert ours.advantages[6] == 0, "an unscorable completion teaches nothing"
    if scale_rewards != "batch":
        assert torch.equal(ours.advantages[3:6], torch.zeros(3)), "a tied group teaches nothing"
    assert ours.advantages.abs().sum() > 0
    assert abs(float(torch.nanmean(ours.rewards)) - metrics["reward"]) < 1e-6
    assert abs(float(nanstd(ours.rewards)) - metrics["reward_std"]) < 1e-6
    assert abs(float(ours.std_zero.float().mean()) - metrics["frac_reward_zero_std"]) < 1e-6
    expected_ties = 0.0 if scale_rewards == "batch" else 3 / len(COMPLETIONS)
    assert abs(metrics["frac_reward_zero_std"] - expected_ties) < 1e-6


# ------------------------------------------------------------------------------------------ the loss
CASES = {
    # id: (loss_type, beta, num_iterations, temperature, importance_sampling_level, epsilon_high, chunked,
    #      use_bias_correction_kl: TRL's default True multiplies the KL term by the importance ratio)
    "grpo-on-policy": ("grpo", 0.0, 1, 1.0, "token", None, True, True),
    "grpo-kl-off-policy-t0.7-full-logits": ("grpo", 0.04, 2, 0.7, "token", None, False, True),
    "bnpo-on-policy-full-logits": ("bnpo", 0.0, 1, 1.0, "token", None, False, True),
    "bnpo-kl-off-policy-t0.7": ("bnpo", 0.04, 2, 0.7, "token", None, True, True),
    "dr_grpo-kl-on-policy-t0.7": ("dr_grpo", 0.04, 1, 0.7, "token", None, True, False),
    "dr_grpo-off-policy-full-logits": ("dr_grpo", 0.0, 2, 1.0, "token", None, False, True),
    "dapo-on-policy": ("dapo", 0.0, 1, 1.0, "token", 0.28, True, True),
    "dapo-kl-off-policy-t0.7-full-logits": ("dapo", 0.04, 2, 0.7, "token", 0.28, False, False),
    "gspo-off-policy": ("grpo", 0.0, 2, 1.0, "sequence", None, True, True),
    "gspo-kl-off-policy-t0.7-full-logits": ("grpo", 0.04, 2, 0.7, "sequence", None, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(tiny, tmp_path, case):
    loss_type, beta, iterations, temperature, level, epsilon_high, chunked, correction = CASES[case]
    epsilon = 0.2
    trainer = _trl(
        tiny,
        tmp_path,
        [REWARDS_LOSS],
        loss_type=loss_type,
        beta=beta,
        num_iterations=iterations,
        temperature=temperature,
        importance_sampling_level=level,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        scale_rewards="group",
        use_bias_correction_kl=correction,
    )
    inputs = _scored(trainer)
    model = tiny.model
    batch = completion_batch(ROWS, COMPLETIONS, tiny.tokenizer.pad_token_id)
    advantages = group_advantages(_rewards_per_func([REWARDS_LOSS]), torch.ones(1), G, "group").advantages
    torch.testing.assert_close(advantages, inputs["advantages"], atol=1e-6, rtol=0)

    ref_logps = None
    if beta:  # the reference: the adapter off; TRL computed its own the same way
        with torch.no_grad(), model.disable_adapter():
            ref_logps, _ = completion_logps(model, batch, chunked=chunked, temperature=temperature)
        torch.testing.assert_close(ref_logps, inputs["ref_per_token_logps"], atol=1e-5, rtol=0)
    old_logps = None
    if iterations == 1:
        assert "old_per_token_logps" not in inputs, "on-policy: TRL uses the current log-probs, detached"
    else:
        # TRL scored the completions with the current weights (the rollout policy of the first iteration);
        # a later iteration's weights have moved: the old log-probs are given, the same tensor to both.
        with torch.no_grad():
            current, mask = completion_logps(model, batch, chunked=chunked, temperature=temperature)
        torch.testing.assert_close(current, inputs["old_per_token_logps"], atol=1e-5, rtol=0)
        noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(2)) * 0.1
        old_logps = (current - torch.tensor(OFFSETS)[:, None] - noise) * mask
        inputs["old_per_token_logps"] = old_logps.clone()

    model.zero_grad(set_to_none=True)
    logps, mask = completion_logps(model, batch, chunked=chunked, temperature=temperature)
    torch.testing.assert_close(mask, inputs["completion_mask"].float(), atol=0, rtol=0)
    assert int(inputs["num_items_in_batch"]) == int(mask.sum())
    ours = grpo_loss(
        logps,
        mask,
        advantages,
        loss_type=loss_type,
        old_logps=old_logps,
        ref_logps=ref_logps,
        beta=beta,
        use_bias_correction_kl=correction,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        importance_sampling_level=level,
        max_completion_length=MAX_COMPLETION_LENGTH,
        dapo_tokens=mask.sum(),
    )
    ours.loss.backward()
    our_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    theirs = trainer._compute_loss(trainer.model, inputs)
    theirs.backward()
    their_grads = _lora_grads(trainer.model)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert abs(ours.loss.item() - theirs.item()) < 1e-5, (ours.loss.item(), theirs.item())
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 0
    assert any(g.abs().max() > 1e-4 for g in our_grads.values()), "the loss must move the adapter"
    for name, grad in our_grads.items():
        diff = (grad - their_grads[name]).abs().max().item()
        assert diff < 1e-5, (name, diff)

    low, high = (masked_mean(x, mask) for x in (ours.low_clipped, ours.high_clipped))
    assert abs(float(low[0] / low[1]) - metrics["clip_ratio/low_mean"]) < 1e-6
    assert abs(float(high[0] / high[1]) - metrics["clip_ratio/high_mean"]) < 1e-6
    if iterations == 2:
        assert ours.low_clipped.sum() > 0 and ours.high_clipped.sum() > 0, "both bounds must clip some"
    else:
        assert ours.low_clipped.sum() == 0 and ours.high_clipped.sum() == 0, "on-policy ratios are 1"
    if beta:
        kl_sum, kl_count = masked_mean(ours.kl, mask)
        assert float(kl_sum) > 0
        assert abs(float(kl_sum / kl_count) - metrics["kl"]) < 1e-6
    else:
        assert ours.kl is None and "kl" not in metrics
