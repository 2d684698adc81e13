"""The data module on real files: a mixed corpus with bad rows, splits, the tokenized cache, the
application presets; the demo task's generator and scorer."""

from __future__ import annotations

import json
import random

import pytest

from lit_lora.config.schema import to_train_config
from lit_lora.data import demo
from lit_lora.data.module import DataModule, encode_rows
from lit_lora.data.rendering import Rendering, count_trained
from lit_lora.errors import UserError
from lit_lora.inference.scoring import exact_match
from lit_lora.training.run import train
from tests.helpers import TINY, compose_train

GOOD = {"instruction": "Translate to French.", "input": "", "output": "Bonjour."}


def mixed_corpus(folder):
    """Three files, good and bad rows mixed; returns the expected counts of the skip policy."""
    folder.mkdir()
    good = [json.dumps({**GOOD, "output": f"Bonjour {i}."}) for i in range(12)]
    # Windows-style file: BOM and CRLF, all rows good.
    (folder / "c_windows.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(good[:6]).encode() + b"\r\n")
    lines = [
        good[6].encode(),
        b"{not json}",
        b'{"instruction": "a", "instruction": "b", "output": "c"}',
        b'{"instruction": "caf\xe9", "output": "c"}',
        b'{"instruction": "a"}',
        b'{"instruction": "a", "output": null}',
        b'{"instruction": "a", "output": 3}',
        b"[1, 2]",
        good[7].encode(),
        json.dumps({**GOOD, "input": "word " * 400}).encode(),  # far over max_seq_len: a bad row
        json.dumps({**GOOD, "input": "word " * 90}).encode(),  # the answer is truncated away: dropped
        good[8].encode(),
    ]
    (folder / "a_rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "b_more.csv").write_text("instruction,input,output\nSay hi.,,hi\nSay bye.,,\nSay yes.,,yes\n")
    return {
        "invalid_json": 1,
        "duplicate_key": 1,
        "invalid_utf8": 1,
        "missing_field": 1,
        "null_field": 1,
        "wrong_type": 1,
        "not_an_object": 1,
        "too_long": 1,
        "empty_field": 1,
    }


def _cfg(tmp_path, *overrides):
    cache = f"data.cache_dir={tmp_path / 'data-cache'}"
    return to_train_config(compose_train([*TINY, f"output_dir={tmp_path / 'run'}", cache, *overrides]))


def test_mixed_corpus_fail_names_the_first_bad_row(tmp_path, tokenizer):
    mixed_corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, "data=files", f"data.source='{tmp_path}/corpus/*'", "data.max_seq_len=96")
    with pytest.raises(
        UserError, match=r"a_rows.jsonl:2: not valid JSON .*\[invalid_json\].*on_bad_row=skip"
    ):
        DataModule(cfg.data, tokenizer, tmp_path / "data").setup()


def test_mixed_corpus_skip_trains_and_reports_counts_by_reason(tmp_path):
    expected = mixed_corpus(tmp_path / "corpus")
    result = train(
        compose_train(
            [
                *TINY,
                f"output_dir={tmp_path / 'run'}",
                "data=files",
                f"data.source='{tmp_path}/corpus/*'",
                "data.max_seq_len=96",
                "data.on_bad_row=skip",
                "data.val_fraction=0.2",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "score=false",
            ]
        )
    )
    stats = result.summary["data"]
    assert stats["bad_rows"] == expected
    assert (
        stats["dropped_no_trained_token"] == 1
        and "a_rows.jsonl:11" in stats["first_of_each"]["dropped_no_trained_token"]
    )
    assert stats["rows_read"] == 21
    good = 6 + 3 + 2  # windows file, a_rows good lines, csv good rows
    assert stats["examples"]["train"] + stats["examples"]["val"] == good
    assert any("byte-order mark" in note for note in stats["notes"])
    assert result.summary["global_step"] == 2


def test_a_row_the_template_or_tokenizer_refuses_is_one_bad_row(tmp_path, tokenizer):
    """Rendering and tokenizing are contained per row: a template's raise_exception() is
    ``template_error``, anything else the tokenizer raises (here a lone surrogate in a row that skipped
    validation) is ``encode_error``; ``fail`` names the row, ``skip`` keeps the others."""
    from lit_lora.data.rows import BadRows, Row

    own = Rendering.resolve(tokenizer).chat_template
    picky = Rendering(
        template="tokenizer",
        chat_template="{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}" + own,
    )
    rows = [
        Row("f.jsonl:1", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
        Row("f.jsonl:2", messages=[{"role": "user", "content": "forbidden"}, {"role": "assistant", "content": "a"}]),
        Row("f.jsonl:3", text="\ud800 never validated"),
        Row("f.jsonl:4", text="plain text"),
    ]  # fmt: skip
    cfg = _cfg(tmp_path).data
    bad = BadRows("skip")
    examples, kept, _ = encode_rows(rows, tokenizer, picky, cfg, bad, desc="t")
    assert [r.loc for r in kept] == ["f.jsonl:1", "f.jsonl:4"] and len(examples) == 2
    assert dict(bad.counts) == {"template_error": 1, "encode_error": 1}
    assert bad.first["template_error"] == (
        "f.jsonl:2: the chat template refuses this row: TemplateError: no forbidden words"
    )
    assert bad.first["encode_error"].startswith("f.jsonl:3: cannot be tokenized: TypeError: ")
    with pytest.raises(UserError, match=r"^f.jsonl:2: .*\[template_error\]"):
        encode_rows(rows, tokenizer, picky, cfg, BadRows("fail"), desc="t")


def test_every_example_has_a_trained_token_and_splits_are_seeded(tmp_path, tokenizer):
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(json.dumps({**GOOD, "output": f"n{i}"}) for i in range(50))
    )
    overrides = [
        "data=files",
        f"data.source={tmp_path}/rows.jsonl",
        "data.val_fraction=0.2",
        "data.test_fraction=0.1",
    ]
    first = DataModule(_cfg(tmp_path, *overrides).data, tokenizer, tmp_path / "d1")
    first.setup()
    assert {k: len(v) for k, v in first.rows.items()} == {"train": 35, "val": 10, "test": 5}
    assert all(count_trained(e["labels"]) > 0 for split in first.examples.values() for e in split)
    second = DataModule(_cfg(tmp_path, *overrides, "data.cache=false").data, tokenizer, tmp_path / "d2")
    second.setup()
    assert [r.loc for r in second.rows["val"]] == [r.loc for r in first.rows["val"]]
    other = DataModule(
        _cfg(tmp_path, *overrides, "data.seed=7", "data.cache=false").data, tokenizer, tmp_path / "d3"
    )
    other.setup()
    assert [r.loc for r in other.rows["val"]] != [r.loc for r in first.rows["val"]]


def test_validation_file_and_split_folder(tmp_path, tokenizer):
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(GOOD) for _ in range(6)))
    (folder / "validation.jsonl").write_text(json.dumps(GOOD))
    data = DataModule(_cfg(tmp_path, "data=files", f"data.source={folder}").data, tokenizer, tmp_path / "d")
    data.setup()
    assert {k: len(v) for k, v in data.rows.items()} == {"train": 6, "val": 1, "test": 0}
    own = DataModule(
        _cfg(
            tmp_path,
            "data=files",
            f"data.source={folder}/train.jsonl",
            f"data.val_source={folder}/validation.jsonl",
        ).data,
        tokenizer,
        tmp_path / "d2",
    )
    own.setup()
    assert len(own.rows["train"]) == 6 and own.rows["val"][0].loc.endswith("validation.jsonl:1")


def test_second_run_reuses_the_tokenized_cache(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(json.dumps({**GOOD, "output": f"n{i}"}) for i in range(20))
    )
    cfg = _cfg(tmp_path, "data=files", f"data.source={tmp_path}/rows.jsonl").data
    first = DataModule(cfg, tokenizer, tmp_path / "d1")
    first.setup()
    assert first.stats["cache"] == "miss"

    import lit_lora.data.module

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(lit_lora.data.module, "encode_rows", no_tokenizing)
    second = DataModule(cfg, tokenizer, tmp_path / "d2")
    second.setup()
    assert second.stats["cache"] == "hit" and second.examples == first.examples
    monkeypatch.undo()
    (tmp_path / "rows.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD))  # new bytes: new key
    third = DataModule(cfg, tokenizer, tmp_path / "d3")
    third.setup()
    assert third.stats["cache"] == "miss" and len(third.rows["train"]) + len(third.rows["val"]) == 2


@pytest.mark.parametrize("preset", ["translation_vi_en", "summarization", "sentiment", "qa"])
def test_application_presets_train_a_few_steps(tmp_path, preset):
    result = train(
        compose_train(
            [
                *TINY,
                f"output_dir={tmp_path / 'run'}",
                f"data={preset}",
                "trainer.max_steps=3",
                "trainer.val_check_interval=3",
                "data.score_max_new_tokens=2",
                "score_base=false",
            ]
        )
    )
    summary = result.summary
    assert summary["global_step"] == 3 and summary["data"]["bad_rows"] == {}
    assert summary["data"]["examples"]["train"] >= 30 and summary["val_loss"] is not None
    assert summary["score_tuned"]["n"] == summary["data"]["examples"]["test"] > 0
    assert (result.output_dir / "adapter" / "rendering.json").is_file()


def test_packing_and_length_grouping_cut_padding(tmp_path, tokenizer):
    rng = random.Random(0)
    rows = [{**GOOD, "output": "la " * rng.randint(1, 120)} for _ in range(200)]
    (tmp_path / "varied.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = ["data=files", f"data.source={tmp_path}/varied.jsonl", "data.max_seq_len=256"]

    def padding(*overrides):
        data = DataModule(_cfg(tmp_path, *source, *overrides).data, tokenizer, tmp_path / "d")
        data.setup()
        return data.stats

    plain = padding()
    grouped = padding("data.group_by_length=true")
    packed = padding("data.packing=true")
    assert grouped["padding_fraction"] < plain["padding_fraction"]
    assert packed["padding_fraction"] < plain["padding_fraction"] / 2
    assert packed["packed_rows"] < packed["examples"]["train"]


def test_packed_run_trains(tmp_path):
    overrides = [
        *TINY,
        f"output_dir={tmp_path / 'run'}",
        "data=qa",
        "data.packing=true",
        "data.group_by_length=true",
    ]
    result = train(compose_train([*overrides, "trainer.max_steps=2", "score=false"]))
    assert result.summary["global_step"] == 2 and result.summary["data"]["packed_rows"] > 0
    assert result.summary["final_train_loss"] is not None


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
    assert exact_match(
        ['{"age":3,"name":"A B"} trailing', '{"name": "A B", "age": "3"}', "nope"], [ref] * 3
    ) == [
        True,
        False,
        False,
    ]
    assert exact_match([" plain "], ["plain"]) == [True]


def test_cli_bad_row_is_one_line_and_exit_2(tmp_path, cli):
    mixed_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    done = cli(*TINY, "data=files", f"data.source={tmp_path}/corpus/a_rows.jsonl", f"output_dir={out}")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{tmp_path}/corpus/a_rows.jsonl:2: not valid JSON" in done.stderr
    assert not (out / "adapter").exists()
