"""Prompt rows (``data.format=prompt``, GRPO): what a row holds, what the rewards see, bad rows, and reading
them from every kind of source with the real SmolLM2 tokenizer and its chat template."""

from __future__ import annotations

import json

import datasets
import pytest

from lit_lora.config.schema import DataConfig, FieldsConfig
from lit_lora.data.batching import EpochSampler, RolloutBatchSampler
from lit_lora.data.module import DataModule, encode_rows
from lit_lora.data.readers import read_file
from lit_lora.data.rendering import Rendering, prompt_ids
from lit_lora.data.rows import BadRows, to_row
from lit_lora.errors import UserError

FIELDS = vars(FieldsConfig())
ROWS = [
    {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Capital of Peru?"},
        ],
        "answer": "Lima",
    },
    {"prompt": "Name a colour.", "system": "Answer in one word.", "tests": ["red", "blue"]},
]


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(path, policy="skip"):
    bad = BadRows(policy)
    rows = [to_row(obj, loc, "prompt", FIELDS, bad) for loc, obj in read_file(path, bad)]
    return [r for r in rows if r is not None], bad


def test_a_prompt_row_keeps_the_prompt_as_given_and_every_other_column_for_the_rewards(tmp_path):
    _write(tmp_path / "p.jsonl", ROWS)
    rows, bad = _rows(tmp_path / "p.jsonl")
    assert not bad.counts and len(rows) == 3
    first, chat, with_system = rows
    assert first.prompt == "What is 2 + 2?" and first.messages == [
        {"role": "user", "content": "What is 2 + 2?"}
    ]
    assert first.columns == {"answer": "4", "level": 1}
    assert chat.prompt == ROWS[1]["prompt"] and chat.messages == ROWS[1]["prompt"]
    assert with_system.messages[0] == {"role": "system", "content": "Answer in one word."}
    assert with_system.columns == {"system": "Answer in one word.", "tests": ["red", "blue"]}
    assert first.to_json()["columns"] == {"answer": "4", "level": 1}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "   ", "answer": "x"}, "empty_field"),
        ({"prompt": [], "answer": "x"}, "empty_field"),
        ({"answer": "x"}, "missing_field"),
        ({"prompt": 3}, "wrong_type"),
        (
            {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "bad_conversation",
        ),
        ({"prompt": [{"role": "robot", "content": "hi"}]}, "bad_role"),
    ],
)
def test_bad_prompt_rows_are_counted_or_fail_naming_the_row(tmp_path, row, reason):
    _write(tmp_path / "p.jsonl", [ROWS[0], row])
    rows, bad = _rows(tmp_path / "p.jsonl")
    assert len(rows) == 1 and bad.counts == {reason: 1}
    with pytest.raises(UserError, match=rf"p.jsonl:2.*\[{reason}\]"):
        _rows(tmp_path / "p.jsonl", policy="fail")


def test_a_prompt_is_rendered_with_the_generation_prompt_and_never_truncated(tmp_path, tokenizer):
    _write(tmp_path / "p.jsonl", [*ROWS, {"prompt": "word " * 300, "answer": "x"}])
    rows, _ = _rows(tmp_path / "p.jsonl")
    rendering = Rendering.resolve(tokenizer)
    bad = BadRows("skip")
    examples, kept, _ = encode_rows(
        rows, tokenizer, rendering, DataConfig(format="prompt"), bad, "t", max_prompt_len=64
    )
    assert len(examples) == 3 and bad.counts == {"prompt_too_long": 1}
    assert (
        "p.jsonl:4" in bad.first["prompt_too_long"]
        and "over data.max_seq_len" in bad.first["prompt_too_long"]
    )
    for i, (example, row) in enumerate(zip(examples, kept, strict=True)):
        assert example["index"] == i
        assert example["input_ids"] == prompt_ids(tokenizer, rendering, row.messages)
    assert tokenizer.decode(examples[0]["input_ids"]).endswith("<|im_start|>assistant\n")


def test_prompt_rows_from_a_saved_dataset_folder_with_a_val_split_and_rollout_batches(tmp_path, tokenizer):
    train = datasets.Dataset.from_list([{"prompt": f"Say {i}.", "answer": str(i)} for i in range(12)])
    datasets.DatasetDict({"train": train, "validation": train.select([0, 1])}).save_to_disk(
        str(tmp_path / "saved")
    )
    cfg = DataConfig(source=str(tmp_path / "saved"), format="prompt", batch_size=4, cache=False)
    data = DataModule(
        cfg, tokenizer, tmp_path / "work", max_prompt_len=100, num_generations=2, num_iterations=2
    )
    data.setup()
    assert len(data.examples["train"]) == 12 and len(data.examples["val"]) == 2
    assert data.rows["train"][3].columns == {"answer": "3"}
    sampler = data.step_sampler()
    assert isinstance(sampler, RolloutBatchSampler) and sampler.micro == 2  # 4 completions = 2 prompts x 2
    batches = list(data.train_dataloader())
    assert len(batches) == 12  # 6 rounds of 2 prompts, each trained twice (num_iterations)
    assert [(b["micro"], b["iteration"]) for b in batches[:2]] == [(0, 0), (0, 1)]
    assert batches[0]["round"].tolist() == batches[1]["round"].tolist() == batches[0]["prompt_index"].tolist()


def test_rollout_batches_resume_between_two_iterations_of_a_round():
    order = EpochSampler(list(range(8)), 2, seed=0)
    whole = list(RolloutBatchSampler(order, micro=2, accum=2, rank=0, world=1, repeat=2))
    assert len(whole) == 8  # 2 rounds x 2 micro-batches x 2 iterations
    resumed = RolloutBatchSampler(order, micro=2, accum=2, rank=0, world=1, repeat=2)
    resumed.start_at(0, examples=4, batches=2)  # after round 1 and the first iteration of round 2
    assert list(resumed) == whole[6:]
