"""The decoding core (lit_lora/inference/decoding.py) on the tiny random model and the real SmolLM2 tokenizer:
greedy answers are ``model.generate``'s, seeded sampling repeats and goes through transformers' own
processors, ``generate`` and the serve engine sample the same tokens, the incremental detokenizer
rebuilds ``tokenizer.decode`` from small decodes, the model's train/eval flags come back after an
error, and no other module of the package decodes on its own."""

from __future__ import annotations

import ast
import random
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from lit_lora.config.schema import ModelConfig
from lit_lora.inference.decoding import (
    GREEDY,
    IncrementalDetokenizer,
    Sampler,
    Sampling,
    decode_loop,
    eval_mode,
    generate_tokens,
    logits_processors,
)
from lit_lora.models.builder import _random_init_folder
from tests.helpers import ROOT, compose_train

TINY = ModelConfig(**OmegaConf.to_container(compose_train(["model=tiny"]).model, resolve=True))
PROMPTS = [[1, 504, 3458, 314], [1, 30, 7], [1, 88, 99, 1000, 2000, 3000, 77, 5, 6], [1, 5]]
NEW = 8
EOS = 2


@pytest.fixture(scope="module")
def model():
    """The tiny base in float64 (batched and lone rows then agree beyond any argmax margin) with one
    LoRA adapter whose B is non-zero, in eval mode."""
    base = AutoModelForCausalLM.from_pretrained(str(_random_init_folder(TINY)), dtype=torch.float64)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return peft.eval()


def _plain_generate(model, prompt: list[int]) -> list[int]:
    """transformers' own greedy answer to one prompt, cut after EOS."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=EOS
        )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def test_greedy_batched_answers_are_plain_generates_alone_with_and_without_the_adapter(model):
    tuned = [_plain_generate(model, p) for p in PROMPTS]
    with model.disable_adapter():
        base = [_plain_generate(model, p) for p in PROMPTS]
    assert tuned != base, "the adapter changes the answers"
    kwargs = {"max_new_tokens": NEW, "pad_id": EOS, "eos_id": EOS}
    assert generate_tokens(model, PROMPTS, **kwargs) == tuned
    assert generate_tokens(model, PROMPTS, adapter=False, **kwargs) == base
    # The key/value loop the serve engine shares, with greedy rows, gives the same tokens.
    assert decode_loop(model, PROMPTS, [Sampler(GREEDY)] * len(PROMPTS), **kwargs) == tuned
    # Fixed length (the retention probe): EOS never chosen, every row max_new_tokens long.
    fixed = generate_tokens(model, PROMPTS, fixed_length=True, **kwargs)
    assert all(len(row) == NEW and EOS not in row for row in fixed)
    streamed: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    generate_tokens(model, PROMPTS, on_token=lambda row, token: streamed[row].append(token), **kwargs)
    assert [streamed[i] for i in range(len(PROMPTS))] == tuned, "streamed tokens are the answer's"


def test_greedy_lone_prompt_is_bitwise_generate_in_float32():
    base = AutoModelForCausalLM.from_pretrained(str(_random_init_folder(TINY)), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        expected = _plain_generate(base, prompt)
        kwargs = {"max_new_tokens": NEW, "pad_id": EOS, "eos_id": EOS}
        assert generate_tokens(base, [prompt], **kwargs) == [expected]
        assert decode_loop(base, [prompt], [Sampler(GREEDY)], **kwargs) == [expected]


def test_seeded_sampling_repeats_differs_by_seed_and_leaves_the_global_generator_alone(model):
    kwargs = {"max_new_tokens": NEW, "pad_id": EOS, "eos_id": EOS}
    state = torch.get_rng_state()
    first = generate_tokens(model, PROMPTS, sampling=Sampling(1.0, 0.95, seed=11), **kwargs)
    assert torch.equal(torch.get_rng_state(), state), "a seeded request does not touch torch's global RNG"
    again = generate_tokens(model, PROMPTS, sampling=Sampling(1.0, 0.95, seed=11), **kwargs)
    assert first == again
    others = [
        generate_tokens(model, PROMPTS[:1], sampling=Sampling(1.0, 0.95, seed=s), **kwargs) for s in (12, 13)
    ]
    assert first[0] not in [o[0] for o in others] and others[0] != others[1]
    # Each row has its own generator: a row answers as its prompt alone with the same seed.
    alone = [generate_tokens(model, [p], sampling=Sampling(1.0, 0.95, seed=11), **kwargs)[0] for p in PROMPTS]
    assert first == alone
    # Rows may mix greedy and sampled: the greedy row is the greedy answer.
    mixed = generate_tokens(model, PROMPTS[:2], sampling=[GREEDY, Sampling(1.0, 0.95, seed=11)], **kwargs)
    assert mixed == [generate_tokens(model, PROMPTS[:1], **kwargs)[0], first[1]]


def test_the_processors_are_transformers_temperature_then_top_p():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 1000, generator=generator) * 3
    history = torch.zeros((1, 0), dtype=torch.long)
    for temperature, top_p in [(0.7, 0.9), (1.0, 0.5), (1.3, 1.0), (1, 0.9)]:
        ours = logits_processors(temperature, top_p)(history, scores.clone())
        by_hand = TopPLogitsWarper(top_p)(
            history, TemperatureLogitsWarper(float(temperature))(history, scores.clone())
        )
        assert torch.equal(ours.softmax(-1), by_hand.softmax(-1)), (temperature, top_p)
        # The nucleus: the fewest most probable tokens whose mass reaches top_p.
        probs = (scores / temperature).softmax(-1)[0].sort(descending=True).values
        kept = int((ours > float("-inf")).sum())
        assert kept == int((probs.cumsum(0) - probs < top_p).sum())
    # The sampler draws from the processed distribution with a generator seeded by the request's seed.
    sampler = Sampler(Sampling(0.7, 0.9, seed=5))
    drawn = [sampler.sample(scores) for _ in range(5)]
    processed = TopPLogitsWarper(0.9)(history, TemperatureLogitsWarper(0.7)(history, scores.clone()))
    reference = torch.Generator().manual_seed(5)
    assert drawn == [int(torch.multinomial(processed.softmax(-1), 1, generator=reference)) for _ in range(5)]


def test_generate_and_the_serve_engine_sample_the_same_answer():
    """A lone serve request and ``generate`` with the same temperature, top_p and seed: the same tokens
    and text (the same model object here, so the same logits; tests/serve/test_serve.py checks it end to end)."""
    from lit_lora.apps.generate import Session
    from lit_lora.config.apps import GenerateConfig
    from lit_lora.serve.engine import Engine, Finished, Job

    cfg = GenerateConfig(model=TINY, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=1234)
    session = Session(cfg)
    messages = [{"role": "user", "content": "Xin chào, bạn khỏe không? 🙂"}]
    pieces: list[str] = []
    reply = session.reply(messages, stream=pieces.append)
    assert reply == session.reply(messages), "seeded: the same answer again, streamed or not"
    assert "".join(pieces) == reply.text
    different = Session(GenerateConfig(model=TINY, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4321))
    assert different.reply(messages).text != reply.text

    from lit_lora.data.rendering import prompt_ids

    tokenizer = session.tokenizer
    done, events = threading.Event(), []
    job = Job(
        adapter=None,
        prompt=prompt_ids(tokenizer, session.rendering, messages),
        max_tokens=cfg.max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        sink=lambda event: events.append(event) or (isinstance(event, Finished) and done.set()),
        temperature=0.9,
        top_p=0.9,
        seed=1234,
        stream=True,
    )
    engine = Engine(session.model, pad_id=tokenizer.pad_token_id, batch_timeout=0.0)
    engine.start()
    try:
        engine.submit(job)
        assert done.wait(120)
    finally:
        engine.close(30)
    finished = events[-1]
    assert finished.text == reply.text and finished.completion_tokens == reply.new_tokens
    assert "".join(e.text for e in events[:-1]) == reply.text, "the engine's stream is its answer"


TEXTS = [
    "Xin chào! Tôi là trợ lý tiếng Việt. Hôm nay trời đẹp quá, phải không?",
    "Emoji: 🙂👍🏽🇻🇳 family 👨‍👩‍👧‍👦 and CJK 日本語のテキスト, math ∑∫ and ẞ.",
    "Mixed: Nguyễn Thị Minh Khai — «quotes» … done 🎉",
]


def _pushed(detokenizer: IncrementalDetokenizer, tokens: list[int]) -> tuple[list[str], str]:
    deltas = [detokenizer.push(t) for t in tokens]
    return deltas, "".join(deltas) + detokenizer.flush()


def test_incremental_detokenizer_rebuilds_decode_with_multibyte_characters(tokenizer):
    for text in TEXTS:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        tokens.insert(len(tokens) // 2, tokenizer.eos_token_id)  # a special token, skipped
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        sizes: list[int] = []

        def decode(ids, sizes=sizes):
            sizes.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=True)

        deltas, streamed = _pushed(IncrementalDetokenizer(decode), tokens)
        assert streamed == full
        assert not any("\ufffd" in d for d in deltas), "a split character waits for its last bytes"
        if "🇻🇳" in text:
            assert "" in deltas, "some emoji byte tokens complete nothing on their own"
        # O(new tokens): each decode sees a window of a few tokens, never the whole answer.
        assert max(sizes) <= 12 < len(tokens), (max(sizes), len(tokens))


def test_incremental_detokenizer_on_random_tokens_and_a_cut_character(tokenizer):
    rng = random.Random(0)
    for _ in range(30):  # random ids: byte pieces of characters in every order, invalid UTF-8 included
        tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        assert _pushed(IncrementalDetokenizer.for_tokenizer(tokenizer), tokens)[1] == tokenizer.decode(
            tokens, skip_special_tokens=True
        )
    # An answer cut inside an emoji: the full decode ends with U+FFFD, so does the flushed stream.
    tokens = tokenizer.encode("ok 🇻🇳", add_special_tokens=False)[:-1]
    deltas, streamed = _pushed(IncrementalDetokenizer.for_tokenizer(tokenizer), tokens)
    assert streamed == tokenizer.decode(tokens) and streamed.endswith("\ufffd") and deltas[-1] == ""


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(0.8, 0.9, seed=1)], ids=["greedy", "sampled"])
def test_train_mode_and_adapter_come_back_when_the_decode_raises(model, sampling, monkeypatch):
    from lit_lora.inference.scoring import preference_accuracy

    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    frozen = model.get_base_model().model.layers[0]
    frozen.eval()  # a module the caller keeps in eval mode inside a training model stays so

    def boom(*args, **kwargs):
        assert not model.training, "decoding runs in eval mode"
        raise _Boom

    monkeypatch.setattr(model.get_base_model().model, "forward", boom)  # the decoder every path runs
    try:
        with pytest.raises(_Boom):
            generate_tokens(model, PROMPTS, max_new_tokens=NEW, pad_id=EOS, sampling=sampling, adapter=False)
        assert model.training and not frozen.training and frozen.self_attn.training is False
        assert all(m.training for m in model.get_base_model().model.layers[1].modules())
        side = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}
        pair = {**side, **{f"rejected_{k}": v for k, v in side.items()}}
        with pytest.raises(_Boom):
            preference_accuracy(model, EOS, [pair], 1, use_adapter=False)
        assert model.training and not frozen.training
    finally:
        monkeypatch.undo()
        model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before), "the adapter is on again"


def test_eval_mode_restores_each_module_flag():
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2))
    )
    net.train()
    net[1][0].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and net[1].training and not net[1][0].training


def _generate_calls(path: Path) -> list[str]:
    """``x.generate(...)`` calls and ``multinomial`` uses in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "generate"
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .generate(")
        name = (
            node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        )
        if name == "multinomial":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} multinomial")
    return found


def test_only_the_decoding_core_calls_generate_or_draws_tokens():
    core = ROOT / "lit_lora" / "inference" / "decoding.py"
    files = sorted([*(ROOT / "lit_lora").rglob("*.py"), *(ROOT / "callbacks").rglob("*.py")])
    outside = [hit for path in files if path != core for hit in _generate_calls(path)]
    assert outside == [], "decode through lit_lora.inference.decoding instead"
    inside = _generate_calls(core)
    assert any(".generate(" in hit for hit in inside) and any("multinomial" in hit for hit in inside)
