"""Chat rendering and loss masking on the embedded SmolLM2 tokenizer: the exact trained / masked boundary."""

from __future__ import annotations

import itertools

import pytest

from lit_lora.data.rendering import (
    IGNORE_INDEX,
    NAMED_TEMPLATES,
    Rendering,
    count_trained,
    encode_conversation,
    encode_text,
    prompt_ids,
)
from lit_lora.errors import UserError

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
THREE_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."},
]


def runs(tokenizer, ids, labels) -> list[tuple[bool, str]]:
    """Consecutive (trained?, decoded text) runs of a sequence."""
    pairs = zip(labels, ids, strict=True)
    return [
        (trained, tokenizer.decode([t for _, t in group]))
        for trained, group in itertools.groupby(pairs, key=lambda p: p[0] != IGNORE_INDEX)
    ]


def test_single_turn_boundary_is_exact(tokenizer):
    rendering = Rendering.resolve(tokenizer)
    assert rendering.template == "tokenizer" and rendering.chat_template == tokenizer.chat_template
    ids, labels = encode_conversation(tokenizer, rendering, THREE_TURNS[:2])
    prompt = SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert runs(tokenizer, ids, labels) == [(False, prompt), (True, "Hello!<|im_end|>")]
    # The boundary index itself: the prompt is exactly the generation prompt, token for token.
    n_prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert ids[:n_prompt] == prompt_ids(tokenizer, rendering, THREE_TURNS[:1])
    assert ids[n_prompt:] == [
        *tokenizer("Hello!", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert labels[n_prompt:] == ids[n_prompt:]


def test_three_turn_chat_trains_only_assistant_turns(tokenizer):
    ids, labels = encode_conversation(tokenizer, Rendering.resolve(tokenizer), THREE_TURNS)
    assert runs(tokenizer, ids, labels) == [
        (False, SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Hello!<|im_end|>"),
        (False, "\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4<|im_end|>"),
        (False, "\n<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n"),
        (True, "You are welcome.<|im_end|>"),
    ]
    assert ids[-1] == tokenizer.eos_token_id, "the sequence ends at EOS, not at the template's newline"


def test_system_prompt_from_config_and_from_the_row(tokenizer):
    rendering = Rendering.resolve(tokenizer, system_prompt="Be terse.")
    ids, _ = encode_conversation(tokenizer, rendering, THREE_TURNS[:2])
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user")
    own = [{"role": "system", "content": "Row system."}, *THREE_TURNS[:2]]
    ids, _ = encode_conversation(tokenizer, rendering, own)
    assert "Be terse." not in tokenizer.decode(ids) and "Row system." in tokenizer.decode(ids)


def test_train_on_inputs_trains_every_token(tokenizer):
    rendering = Rendering.resolve(tokenizer, train_on_inputs=True)
    ids, labels = encode_conversation(tokenizer, rendering, THREE_TURNS)
    assert labels == ids


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_named_templates_close_every_answer_with_eos(tokenizer, template):
    rendering = Rendering.resolve(tokenizer, template)
    assert rendering.chat_template == NAMED_TEMPLATES[template]
    ids, labels = encode_conversation(tokenizer, rendering, THREE_TURNS)
    trained = [text for is_trained, text in runs(tokenizer, ids, labels) if is_trained]
    assert trained == ["Hello!<|im_end|>", "4<|im_end|>", "You are welcome.<|im_end|>"]
    if template == "alpaca":
        first_prompt = runs(tokenizer, ids, labels)[0][1]
        assert first_prompt == "### Instruction:\nHi there\n\n### Response:\n"


def test_auto_falls_back_to_chatml_without_a_tokenizer_template(tokenizer):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        assert Rendering.resolve(tokenizer, "auto").template == "chatml"
        with pytest.raises(UserError, match="has no chat template"):
            Rendering.resolve(tokenizer, "tokenizer")
    finally:
        tokenizer.chat_template = original


def test_saved_rendering_rebuilds_the_same_prompt(tokenizer, tmp_path):
    rendering = Rendering.resolve(tokenizer, "alpaca", system_prompt="Sys.", format="chat")
    rendering.save(tmp_path)
    loaded = Rendering.load(tmp_path)
    assert loaded == rendering
    assert prompt_ids(tokenizer, loaded, THREE_TURNS[:3]) == prompt_ids(tokenizer, rendering, THREE_TURNS[:3])


def test_raw_text_trains_every_token_and_eos(tokenizer):
    ids, labels = encode_text(tokenizer, "Continued pre-training text.")
    assert labels == ids and ids[-1] == tokenizer.eos_token_id
    assert count_trained(labels) == len(ids) - 1  # position 0 is never predicted
