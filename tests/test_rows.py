"""Row sources and validation: every kind of bad row named with its location; real files via `datasets`."""

from __future__ import annotations

import json
import time

import datasets
import pytest

from lit_lora.config import FieldsConfig
from lit_lora.errors import UserError
from lit_lora.rows import BadRows, expand_files, read_csv, read_file, read_hub, read_json, read_saved, to_row

FIELDS = vars(FieldsConfig())
GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def _rows(path, fmt="alpaca", policy="skip"):
    bad = BadRows(policy)
    rows = [to_row(obj, loc, fmt, FIELDS, bad) for loc, obj in read_file(path, bad)]
    return [r for r in rows if r is not None], bad


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json}", "invalid_json"),
        (b'{"instruction": "a", "instruction": "b", "output": "c"}', "duplicate_key"),
        (b'{"instruction": "caf\xe9", "output": "c"}', "invalid_utf8"),
        (b'{"instruction": "a"}', "missing_field"),
        (b'{"instruction": "a", "output": null}', "null_field"),
        (b'{"instruction": "a", "output": "   "}', "empty_field"),
        (b'{"instruction": "a", "output": 3}', "wrong_type"),
        (b'{"instruction": "a", "input": ["x"], "output": "b"}', "wrong_type"),
        (b"[1, 2]", "not_an_object"),
    ],
)
def test_each_bad_row_kind_is_named_with_file_and_line(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(UserError, match=rf"rows.jsonl:3: .*\[{reason}\]"):
        _rows(path, policy="fail")
    rows, bad = _rows(path, policy="skip")
    assert len(rows) == 1 and dict(bad.counts) == {reason: 1}
    assert bad.first[reason].startswith(f"{path}:3:")


def test_bom_and_crlf_are_read_and_noted(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(GOOD).encode() for _ in range(3)) + b"\r\n")
    rows, bad = _rows(path, policy="fail")
    assert len(rows) == 3 and not bad.counts
    assert any("byte-order mark" in n for n in bad.notes) and any("CRLF" in n for n in bad.notes)
    assert rows[0].messages[-1] == {"role": "assistant", "content": "hi"}


def test_chat_and_sharegpt_rows(tmp_path):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad_role = {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ends_with_user = {"messages": [{"role": "user", "content": "q"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (chat, share, bad_role, ends_with_user)))
    rows, bad = _rows(path, fmt="chat")
    assert [r.messages for r in rows] == [chat["messages"], chat["messages"]]
    assert dict(bad.counts) == {"bad_role": 1, "bad_conversation": 1}
    assert bad.first["bad_role"].startswith(f"{path}:3 (turn 1)")


def test_prompt_completion_with_renamed_fields_and_text(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"doc": "long text", "sum": "short", "system": "Summarize."}) + "\n")
    fields = {**FIELDS, "prompt": "doc", "completion": "sum"}
    bad = BadRows("fail")
    (row,) = [to_row(o, loc, "prompt_completion", fields, bad) for loc, o in read_file(path, bad)]
    assert row.messages == [
        {"role": "system", "content": "Summarize."},
        {"role": "user", "content": "long text"},
        {"role": "assistant", "content": "short"},
    ]
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "raw words"}\n')
    rows, _ = _rows(text, fmt="text")
    assert rows[0].text == "raw words" and rows[0].messages is None


def test_csv_reads_every_column_as_text(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('instruction,input,output\nCode?,"a, quoted ""field""",007\nEmpty,,\n')
    rows, bad = _rows(path)
    assert rows[0].messages[0]["content"] == 'Code?\n\na, quoted "field"'
    assert rows[0].messages[1]["content"] == "007", "a numeric-looking answer stays text"
    assert dict(bad.counts) == {"empty_field": 1} and bad.first["empty_field"].startswith(f"{path}:3:")


def test_csv_with_a_broken_line(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("instruction,output\na,b\nc,d,e,f\ng,h\n")
    with pytest.raises(UserError, match=r"broken.csv:3: expected 2 fields .*got 4"):
        read_csv(path, BadRows("fail"))
    bad = BadRows("skip")
    rows = read_csv(path, bad)
    assert [(loc.rsplit(":", 1)[1], row) for loc, row in rows] == [
        ("2", {"instruction": "a", "output": "b"}),
        ("4", {"instruction": "g", "output": "h"}),
    ]
    assert dict(bad.counts) == {"bad_csv_line": 1}


def test_json_array_parquet_and_saved_dataset(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, {"instruction": "x"}]))
    bad = BadRows("skip")
    items = read_json(tmp_path / "a.json", bad)
    assert [loc.rsplit(":", 1)[1] for loc, _ in items] == ["item 1", "item 2"]
    (tmp_path / "b.json").write_text('[{"a": 1,}]')
    with pytest.raises(UserError, match=r"b.json:1: not valid JSON"):
        read_json(tmp_path / "b.json", BadRows("skip"))

    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "output": "hey"}])
    ds.to_parquet(str(tmp_path / "c.parquet"))
    rows, _ = _rows(tmp_path / "c.parquet")
    assert [r.messages[-1]["content"] for r in rows] == ["hi", "hey"]

    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    saved = read_saved(tmp_path / "saved")
    assert {k: len(v) for k, v in saved.items()} == {"train": 2, "val": 1}


def test_globs_expand_sorted_and_unknown_types_fail(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text(json.dumps(GOOD) + "\n")
    assert [p.name for p in expand_files(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(UserError, match="matches no file"):
        expand_files(str(tmp_path / "*.parquet"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        expand_files(str(tmp_path / "x.txt"))


def test_hub_dataset_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"needs the Hugging Face hub.*save_to_disk"):
        read_hub("hf:tatsu-lab/alpaca", "train", None)
    assert time.perf_counter() - started < 15
