"""Rendering, loss masking and batching on the embedded SmolLM2 tokenizer; the demo task's generator."""

from __future__ import annotations

import json

import pytest
import torch

from lit_lora import demo
from lit_lora.config import ModelConfig
from lit_lora.data import IGNORE_INDEX, Rendering, collate, encode, read_rows
from lit_lora.errors import UserError
from lit_lora.model import load_tokenizer

ROW = {"instruction": "Extract.", "input": "Ana Silva, 30, chef in Lima.", "output": '{"name": "Ana Silva"}'}


@pytest.fixture(scope="module")
def tokenizer():
    cfg = ModelConfig(name_or_path="embedded:smollm2-135m")
    return load_tokenizer(cfg, "embedded:smollm2-135m", True)


def test_only_the_answer_and_its_eos_are_trained(tokenizer):
    ex = encode(tokenizer, Rendering(), ROW, 256)
    trained = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == ROW["output"] + "<|im_end|>"
    first = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
    # Everything before the boundary is the prompt, ending with the assistant header.
    assert tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert ex["input_ids"][-1] == tokenizer.eos_token_id, (
        "the sequence ends at EOS, not at the template's newline"
    )


def test_system_prompt_is_rendered(tokenizer):
    ex = encode(tokenizer, Rendering(system_prompt="Be terse."), ROW, 256)
    assert "<|im_start|>system\nBe terse.<|im_end|>" in tokenizer.decode(ex["input_ids"])


def test_truncation_keeps_a_trained_token_or_drops_the_row(tokenizer):
    full = encode(tokenizer, Rendering(), ROW, 256)
    prompt_len = full["labels"].index(next(label for label in full["labels"] if label != IGNORE_INDEX))
    assert encode(tokenizer, Rendering(), ROW, prompt_len) is None
    cut = encode(tokenizer, Rendering(), ROW, prompt_len + 2)
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 2


def test_collate_pads_right_with_masked_labels(tokenizer):
    a = encode(tokenizer, Rendering(), ROW, 256)
    b = encode(tokenizer, Rendering(), {**ROW, "input": ""}, 256)
    batch = collate([a, b], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(a["input_ids"]))
    short = len(b["input_ids"])
    assert batch["attention_mask"][1, short:].sum() == 0
    assert torch.all(batch["labels"][1, short:] == IGNORE_INDEX)


def test_demo_rows_are_deterministic_and_test_names_are_unseen(tmp_path):
    assert demo.make_rows(5, 3, False) == demo.make_rows(5, 3, False)
    paths = demo.write_splits(tmp_path, 200, 10, 50, seed=1)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    train_first = {json.loads(r["output"])["name"].split()[0] for r in train}
    test_first = {json.loads(r["output"])["name"].split()[0] for r in test}
    assert not train_first & test_first
    record = json.loads(test[0]["output"])
    assert list(record) == ["name", "age", "job", "city"] and isinstance(record["age"], int)
    assert record["name"] in test[0]["input"] and record["city"] in test[0]["input"]


def test_exact_match_parses_json_and_rejects_near_misses():
    ref = '{"name": "A B", "age": 3}'
    assert demo.exact_match(
        ['{"age":3,"name":"A B"} trailing', '{"name": "A B", "age": "3"}', "nope"], [ref] * 3
    ) == [
        True,
        False,
        False,
    ]
    assert demo.exact_match([" plain "], ["plain"]) == [True]


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(UserError, match=r"train.jsonl:2: not valid JSON"):
        read_rows(path)
    path.write_text('{"instruction": "a"}\n')
    with pytest.raises(UserError, match=r"train.jsonl:1: .*'output'"):
        read_rows(path)
