"""The serving engine (lit_lora/serve/engine.py) on the tiny model in float64: requests for two adapters
and the base, arriving one by one while others decode (continuous batching, left-padded cache joins,
finished rows leaving), give the tokens ``generate`` gives each alone; DoRA adapters, which PEFT cannot
mix in one batch, are decoded one adapter at a time with the same result. Seeded sampled requests get
the decoding core's tokens whatever shares their batch, and streamed text is the full decode."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from lit_lora.config.schema import ModelConfig
from lit_lora.models.builder import _random_init_folder
from lit_lora.serve.engine import Engine, Finished, Job
from tests.helpers import compose_train

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


def _run(engine: Engine, jobs: list[Job]) -> list[list]:
    """Submit ``jobs`` a little apart (most join a running batch); each job's events once all finish."""
    events: list[list] = [[] for _ in jobs]
    left = threading.Semaphore(0)
    for i, job in enumerate(jobs):

        def sink(event, i=i):
            events[i].append(event)
            if isinstance(event, Finished):
                left.release()

        job.sink = sink
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
            time.sleep(0.002)
        for _ in jobs:
            assert left.acquire(timeout=120)
    finally:
        engine.close(30)
    return events


def test_seeded_sampled_requests_in_a_batch_get_the_tokens_of_the_decoding_core_alone():
    """Sampled rows go through the core's processors and each request's own seeded generator: the
    tokens of ``generate_tokens`` for that prompt alone with the same settings, whatever shares the
    batch (greedy rows, other adapters, other seeds)."""
    from lit_lora.inference.decoding import GREEDY, Sampling, generate_tokens

    model = _model(dora=False)
    eos = model.config.eos_token_id
    settings = [Sampling(0.9, 0.9, seed=7), GREEDY, Sampling(1.3, 0.5, seed=8), Sampling(0.9, 0.9, seed=9)]
    plan = [
        (name, prompt, s)
        for prompt in PROMPTS
        for name, s in zip(("a", None, "b", "a"), settings, strict=True)
    ]
    expected = []
    for name, prompt, sampling in plan:
        if name is not None:
            model.set_adapter(name)
        kwargs = {"max_new_tokens": NEW_TOKENS, "pad_id": eos, "eos_id": eos, "sampling": sampling}
        expected.append(generate_tokens(model, [prompt], adapter=name is not None, **kwargs)[0])
    jobs = [
        Job(
            adapter=name,
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            eos_id=eos,
            decode=lambda tokens: " ".join(map(str, tokens)),
            sink=print,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
        )
        for name, prompt, s in plan
    ]
    engine = Engine(model, pad_id=eos, max_batch_size=4, batch_timeout=0.0)
    _run(engine, jobs)
    assert [job.tokens for job in jobs] == expected
    assert engine.stats()["peak_batch"] > 1


def test_streamed_text_is_the_full_decode_and_stops_at_a_stop_string(tokenizer):
    """Streaming with the real tokenizer (the tiny model's answers are byte soup: split characters
    everywhere): the deltas add up to ``tokenizer.decode`` of the answer, and a stop string cuts it."""
    model = _model(dora=False)
    eos = model.config.eos_token_id

    def job(seed: int, stop: tuple[str, ...] = ()) -> Job:
        return Job(
            adapter="a",
            prompt=PROMPTS[0],
            max_tokens=24,
            eos_id=eos,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            sink=print,
            temperature=1.0,
            seed=seed,
            stop=stop,
            stream=True,
        )

    jobs = [job(seed) for seed in range(4)]
    for done, events in zip(jobs, _run(Engine(model, pad_id=eos, batch_timeout=0.0), jobs), strict=True):
        full = tokenizer.decode(done.tokens, skip_special_tokens=True)
        assert events[-1].text == full and "".join(e.text for e in events[:-1]) == full
    text = events[-1].text
    assert len(text) > 6, "seed 3 answers long enough to hold a stop string in its middle"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    again = job(3, (stop, "never"))
    [events] = _run(Engine(model, pad_id=eos, batch_timeout=0.0), [again])
    assert events[-1].text == text[: text.index(stop)] and events[-1].reason == "stop"
    assert "".join(e.text for e in events[:-1]) == events[-1].text
