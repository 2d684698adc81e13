"""The serving engine (lit_lora/serve_engine.py) on the tiny model in float64: requests for two adapters
and the base, arriving one by one while others decode (continuous batching, left-padded cache joins,
finished rows leaving), give the tokens ``generate`` gives each alone; DoRA adapters, which PEFT cannot
mix in one batch, are decoded one adapter at a time with the same result."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lit_lora.builder import _random_init_folder
from lit_lora.config import ModelConfig
from lit_lora.serve_engine import Engine, Finished, Job
from tests.conftest import compose_train

TINY = ModelConfig(**OmegaConf.to_container(compose_train(["model=tiny"]).model, resolve=True))
PROMPTS = [[1, 504, 3458, 314], [1, 30, 7], [1, 88, 99, 1000, 2000, 3000, 77], [1, 5]]
NEW_TOKENS = 8


def _model(dora: bool):
    """The tiny base in float64 with adapters ``a`` and ``b`` (non-zero B), DoRA or plain LoRA."""
    base = AutoModelForCausalLM.from_pretrained(str(_random_init_folder(TINY)), dtype=torch.float64)
    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "use_dora": dora}
    model = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], **config), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["k_proj", "o_proj"], **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


def _alone(model, adapter: str | None, prompt: list[int]) -> list[int]:
    """Greedy tokens of one request through ``generate`` (up to and including EOS)."""
    eos = model.config.eos_token_id
    ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(
                    input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos
                )
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("dora", [False, True], ids=["lora-mixed-batches", "dora-one-adapter-at-a-time"])
def test_interleaved_requests_get_the_tokens_they_get_alone(dora):
    model = _model(dora)
    jobs = [(name, prompt) for prompt in PROMPTS for name in ("a", None, "b")]
    expected = [_alone(model, name, prompt) for name, prompt in jobs]
    answers = {
        name: [e for (n, _), e in zip(jobs, expected, strict=True) if n == name] for name in ("a", None, "b")
    }
    assert answers["a"] != answers[None] and answers["b"] != answers[None] and answers["a"] != answers["b"]

    engine = Engine(model, pad_id=model.config.eos_token_id, max_batch_size=4, batch_timeout=0.0)
    results: dict[int, list[int]] = {}
    done = threading.Event()

    def sink(i):
        def receive(event):
            if isinstance(event, Finished):
                results[i] = submitted[i].tokens
                if len(results) == len(jobs):
                    done.set()

        return receive

    submitted = [
        Job(
            adapter=name,
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            eos_id=model.config.eos_token_id,
            decode=lambda tokens: " ".join(map(str, tokens)),
            sink=sink(i),
        )
        for i, (name, prompt) in enumerate(jobs)
    ]
    engine.start()
    try:
        for job in submitted:  # staggered: most join a batch that is already decoding
            engine.submit(job)
            time.sleep(0.002)
        assert done.wait(120)
    finally:
        engine.close(30)
    assert [results[i] for i in range(len(jobs))] == expected
    assert engine.stats()["peak_batch"] > 1
