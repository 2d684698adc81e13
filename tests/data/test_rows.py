"""Row sources and validation: every kind of bad row named with its location; real files via `datasets`."""

from __future__ import annotations

import json
import time

import datasets
import pytest

from lit_lora.config.schema import FieldsConfig
from lit_lora.data.readers import read_csv, read_file, read_hub, read_json, read_saved
from lit_lora.data.rows import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, MAX_ROW_BYTES, BadRows, to_row
from lit_lora.data.sources import expand_files
from lit_lora.errors import UserError

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
        (b'{"instruction": "\\ud800", "output": "c"}', "unencodable_text"),
        (b'{"instruction": "a", "output": "b", "score": NaN}', "invalid_json"),
        (b'{"instruction": "a", "output": "b", "score": -Infinity}', "invalid_json"),
        (b'{"instruction": "a", "output": "b", "id": ' + b"9" * 5000 + b"}", "bad_number"),
        (b'{"instruction": "a", "output": "b", "score": 1e400}', "bad_number"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (b'{"instruction": "a", "output": "b", "x": ' + b"[" * 64 + b"]" * 64 + b"}", "too_deep"),
        (b'{"instruction": "a", "output": "b"}' + b" " * MAX_ROW_BYTES, "row_too_large"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_bad_row_kind_is_named_with_file_and_line(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(UserError, match=rf"rows.jsonl:3: .*\[{reason}\]"):
        _rows(path, policy="fail")
    rows, bad = _rows(path, policy="skip")
    assert len(rows) == 1 and dict(bad.counts) == {reason: 1}
    assert bad.first[reason].startswith(f"{path}:3:")


def test_values_at_the_limits_are_accepted(tmp_path):
    """The limits refuse only what is past them: depth 64, a 640-character number, a finite float."""
    row = {**GOOD, "extra": json.loads("[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))}
    path = tmp_path / "edge.jsonl"
    path.write_bytes(
        json.dumps(row).encode()
        + b"\n"
        + b'{"instruction": "a", "output": "b", "id": '
        + b"9" * MAX_NUMBER_CHARS
        + b', "x": 1.7976931348623157e308}\n'
    )
    rows, bad = _rows(path, policy="fail")
    assert len(rows) == 2 and not bad.counts


def test_every_text_of_a_chat_is_checked_for_what_the_tokenizer_can_encode(tmp_path):
    def chat(role="user", content="q", system="s"):
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": role, "content": content},
                {"role": "assistant", "content": "a"},
            ]
        }

    rows = [chat(content="\ud800"), chat(role="us\udfffer"), chat(system="\udc00 sys"), chat()]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))  # ensure_ascii: the surrogates as \u escapes
    kept, bad = _rows(path, fmt="chat")
    assert [r.loc for r in kept] == [f"{path}:4"] and dict(bad.counts) == {"unencodable_text": 3}
    assert bad.first["unencodable_text"] == (
        f"{path}:1 (turn 2): field 'content' holds text the tokenizer cannot encode: "
        "a lone UTF-16 surrogate U+D800 at character 1"
    )
    opening_answer = {"messages": [{"role": "assistant", "content": "a"}]}
    path.write_text(json.dumps(opening_answer))
    with pytest.raises(UserError, match=r"chat.jsonl:1: a conversation must not open with an assistant turn"):
        _rows(path, fmt="chat", policy="fail")


def test_messages_stay_on_one_printable_line(tmp_path):
    """A row's own text can hold line breaks, escapes and surrogates: messages show them escaped and cut."""
    odd = "ro\nle\x1b" + "x" * 500
    rows = {
        "role.jsonl": json.dumps(
            {"messages": [{"role": odd, "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
        "key.jsonl": '{"\\ud800\\n": 1, "\\ud800\\n": 2}',
    }
    for name, line in rows.items():
        (tmp_path / name).write_text(line)
        with pytest.raises(UserError) as raised:
            _rows(tmp_path / name, fmt="chat", policy="fail")
        message = str(raised.value)
        assert message.isprintable() and "\\n" in message and len(message) < 300, message
    assert "\\ud800" in message


def test_a_byte_order_mark_where_files_were_joined_is_read_and_noted(tmp_path):
    path = tmp_path / "joined.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n"
    )
    rows, bad = _rows(path, policy="fail")
    assert len(rows) == 2
    assert f"{path}:2: byte-order mark at the start of the row ignored (files joined together?)" in bad.notes


def test_an_unreadable_source_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"gone.jsonl: cannot be read"):
        read_file(tmp_path / "gone.jsonl", BadRows("skip"))


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


def test_csv_records_are_contained_one_by_one(tmp_path):
    """Invalid UTF-8, broken quoting and a second file's header (with its byte-order mark) each cost
    their own line; a field far over the csv module's default 128 KiB limit is read."""
    long = "y" * 200_000
    lines = [
        b"instruction,output",
        b"a,b",
        "caf\u00e9,c".encode("latin-1"),
        b'x"y,z',
        b"a\rb,c",
        b"\xef\xbb\xbfinstruction,output",
        f"long,{long}".encode(),
        b"g,h",
    ]
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, bad = _rows(path)
    assert [(r.loc.rsplit(":", 1)[1], r.messages[-1]["content"]) for r in rows] == [
        ("2", "b"),
        ("4", "z"),  # a quote inside an unquoted field is kept, as Python's csv reads it
        ("7", long),
        ("8", "h"),
    ]
    assert dict(bad.counts) == {"invalid_utf8": 1, "bad_csv_line": 1}
    assert bad.first["bad_csv_line"].startswith(f"{path}:5: not valid CSV")
    assert any("repeated header" in n and f"{path}:6" in n for n in bad.notes)
    assert any("byte-order mark" in n and f"{path}:6" in n for n in bad.notes)
    (tmp_path / "twice.csv").write_text("output,output\na,b\n")
    with pytest.raises(UserError, match="names column 'output' twice"):
        read_csv(tmp_path / "twice.csv", BadRows("skip"))


def test_rows_from_tables_of_any_type_are_validated(tmp_path):
    """Parquet and saved datasets hand over ints, lists, bytes and images: wrong types are bad rows,
    a row the datasets library cannot decode (a corrupt image) is one bad row, and a saved torch
    format does not turn text into tensors."""
    features = datasets.Features(
        {
            "instruction": datasets.Value("string"),
            "output": datasets.Value("int64"),
            "picture": datasets.Image(),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "instruction": ["a", "b"],
            "output": [1, 2],
            "picture": [None, {"bytes": b"not an image", "path": None}],
        },
        features=features,
    )
    table.to_parquet(str(tmp_path / "typed.parquet"))
    rows, bad = _rows(tmp_path / "typed.parquet")
    assert not rows and dict(bad.counts) == {"wrong_type": 1, "undecodable_row": 1}
    assert bad.first["undecodable_row"].startswith(f"{tmp_path / 'typed.parquet'}:row 2: ")

    good = datasets.Dataset.from_list([GOOD])
    good.set_format("torch")
    good.save_to_disk(str(tmp_path / "torch"))
    saved = read_saved(tmp_path / "torch", BadRows("fail"))
    assert saved["train"][0][1] == GOOD


def test_json_array_parquet_and_saved_dataset(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([GOOD, {"instruction": "x"}], indent=1))
    bad = BadRows("skip")
    items = read_json(tmp_path / "a.json", bad)
    assert [loc.rsplit(":", 1)[1] for loc, _ in items] == ["2 (item 1)", "7 (item 2)"]
    (tmp_path / "b.json").write_text('[{"a": 1}\n')
    with pytest.raises(UserError, match=r"b.json:1: not a valid JSON array \(it is never closed"):
        read_json(tmp_path / "b.json", BadRows("skip"))

    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "output": "hey"}])
    ds.to_parquet(str(tmp_path / "c.parquet"))
    rows, _ = _rows(tmp_path / "c.parquet")
    assert [r.messages[-1]["content"] for r in rows] == ["hi", "hey"]

    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    saved = read_saved(tmp_path / "saved", BadRows("fail"))
    assert {k: len(v) for k, v in saved.items()} == {"train": 2, "val": 1}


def test_a_broken_item_of_a_json_array_is_one_bad_row(tmp_path):
    """Items are split by their brackets, commas and strings and parsed one by one, so each of these
    costs its own item only; the good item after them is read."""
    items = [
        b'{"a": 1,}',
        b'{"instruction": "a", "output": NaN}',
        b'{"instruction": "caf\xe9", "output": "c"}',
        b"[" * 70 + b"]" * 70,
        b'{"instruction": "a", "instruction": "b", "output": "c"}',
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode(),  # a byte-order mark from a joined file: noted
        json.dumps(GOOD).encode(),
    ]
    path = tmp_path / "items.json"
    path.write_bytes(b"[\n" + b",\n".join(items) + b"\n]")
    rows, bad = _rows(path)
    assert [r.loc for r in rows] == [f"{path}:7 (item 6)", f"{path}:8 (item 7)"]
    assert dict(bad.counts) == {"invalid_json": 2, "invalid_utf8": 1, "too_deep": 1, "duplicate_key": 1}
    assert bad.first["invalid_json"].startswith(f"{path}:2 (item 1): not valid JSON")
    assert any("byte-order mark" in note for note in bad.notes)


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
        read_hub("hf:tatsu-lab/alpaca", "train", None, BadRows("fail"))
    assert time.perf_counter() - started < 15
