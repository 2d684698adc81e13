"""GRPO's rollouts (lit_lora/inference/rollouts.py) on the tiny random model: a group decoded from one prefill
is the same as its prompt repeated, seeds make a round repeatable and distinct per step and prompt, the
model is left as it was (eval flags, no copy of a weight)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lit_lora.config.schema import ModelConfig
from lit_lora.inference.decoding import Sampler, Sampling, decode_loop, eval_mode
from lit_lora.inference.rollouts import LocalRollouts, group_seed, row_seed
from lit_lora.models.builder import _random_init_folder
from tests.helpers import compose_train

TINY = ModelConfig(**OmegaConf.to_container(compose_train(["model=tiny"]).model, resolve=True))
PROMPTS = [[1, 504, 3458, 314], [1, 30, 7], [1, 88, 99, 1000, 2000, 3000, 77, 5, 6]]
G = 3


@pytest.fixture(scope="module")
def model():
    """The tiny base in float64 with a LoRA adapter whose B is non-zero, in train mode (as in training)."""
    base = AutoModelForCausalLM.from_pretrained(str(_random_init_folder(TINY)), dtype=torch.float64)
    torch.manual_seed(0)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return peft.train()


def _engine(**kw) -> LocalRollouts:
    return LocalRollouts(
        max_new_tokens=kw.pop("max_new_tokens", 10), temperature=1.0, top_p=0.9, pad_id=0, eos_id=2, **kw
    )


def test_a_group_from_one_prefill_equals_its_prompt_repeated(model):
    samplers = lambda: [Sampler(Sampling(1.0, 0.9, seed=100 + i)) for i in range(len(PROMPTS) * G)]  # noqa: E731
    with eval_mode(model):
        shared = decode_loop(model, PROMPTS, samplers(), max_new_tokens=10, pad_id=0, eos_id=2, repeats=G)
        repeated = [p for p in PROMPTS for _ in range(G)]
        plain = decode_loop(model, repeated, samplers(), max_new_tokens=10, pad_id=0, eos_id=2)
    assert shared == plain
    assert len({tuple(t) for t in shared}) > len(PROMPTS), "a group's rows draw different completions"


def test_rounds_repeat_for_the_same_seeds_and_differ_across_steps_and_prompts(model):
    engine = _engine()
    seeds = [group_seed(42, 3, i) for i in (7, 8, 9)]
    first = engine.rollout(model, PROMPTS, G, seeds)
    again = engine.rollout(model, PROMPTS, G, seeds)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    later = engine.rollout(model, PROMPTS, G, [group_seed(42, 4, i) for i in (7, 8, 9)])
    assert [c.tokens for c in later] != [c.tokens for c in first]
    assert len({group_seed(42, s, i) for s in range(50) for i in range(50)}) == 2500
    assert row_seed(1, 0) != row_seed(0, 1)


def test_a_rows_completion_does_not_depend_on_the_other_prompts_of_the_round(model):
    engine = _engine()
    seeds = [group_seed(1, 0, i) for i in range(3)]
    together = engine.rollout(model, PROMPTS, G, seeds)
    alone = engine.rollout(model, PROMPTS[1:2], G, seeds[1:2])
    assert [c.tokens for c in together[G : 2 * G]] == [c.tokens for c in alone]


def test_truncation_is_reported_and_the_training_model_is_left_as_it_was(model):
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine = _engine(max_new_tokens=3)
    out = engine.rollout(model, PROMPTS, G, [1, 2, 3])
    assert len(out) == len(PROMPTS) * G
    for c in out:
        assert 1 <= len(c.tokens) <= 3
        assert c.truncated == (len(c.tokens) == 3 and c.tokens[-1] != 2)
    assert model.training and all(m.training for m in model.modules()), "train mode is restored"
    assert weights == {n: p.data_ptr() for n, p in model.named_parameters()}, "no weight copied or moved"
