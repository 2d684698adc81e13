"""Fuzzing the whole row-to-token pipeline: hostile rows in every source format, the real tokenizer.

The promise (README, Guarantees): whatever one row holds, reading, parsing, validating, rendering and
tokenizing it either yields a well-masked example or makes it a bad row. With ``data.on_bad_row=skip``
nothing is raised and every row read is accounted for (kept, bad by reason, or dropped); with ``fail``
the run either succeeds or stops with one :class:`UserError` line that starts with the row's location.

The bulk is a seeded generator (:class:`Hostile`) drawing from a catalogue of hostile values: every
Unicode category (lone surrogates, private use, control, unassigned, format characters), NaN and
Infinity literals, deep nesting, huge and out-of-range numbers, very long lines, raw invalid bytes
(latin-1 in a UTF-8 file, overlong and surrogate encodings), byte-order marks in the middle of a file,
duplicate keys, special-token and template text. Each source format gets ``FUZZ_ROWS`` rows per row
format (default 200, for CI; ``make fuzz`` runs 10,000); ``FUZZ_SEED`` changes the draw. A smaller
hypothesis property test adds arbitrary text of every category, derandomized.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_lora.config.schema import DataConfig, to_train_config
from lit_lora.data.module import DataModule
from lit_lora.data.readers import read_json
from lit_lora.data.rendering import IGNORE_INDEX, count_trained
from lit_lora.data.rows import MAX_JSON_DEPTH, MAX_NUMBER_CHARS, MAX_ROW_BYTES, BadRows
from lit_lora.errors import UserError
from tests.helpers import TINY, compose_train, run_cli

FUZZ_ROWS = int(os.environ.get("FUZZ_ROWS", "200"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20240917"))
MAX_SEQ_LEN = 64

# Reasons the pipeline names for the causes it knows. The catch-all reasons of its safety nets
# (``unreadable_row`` in reading and validation, ``encode_error`` in tokenizing) must never be needed
# for anything in the catalogue: a real cause deserves its own reason.
KNOWN_REASONS = {
    "invalid_json", "duplicate_key", "invalid_utf8", "not_an_object", "missing_field", "null_field",
    "empty_field", "wrong_type", "bad_role", "bad_conversation", "bad_csv_line", "row_too_large",
    "too_deep", "bad_number", "unencodable_text", "too_long", "undecodable_row",
}  # fmt: skip
# A bad-row message: ``<file>:<line>[ (item N)][ (turn N)]: <detail> [<reason>]; fix the row, ...``
# (``<source>:row N`` for rows read by the datasets library).
BAD_ROW_LINE = re.compile(
    r"^(?P<source>.+?):(?:\d+(?: \(item \d+\))?|row \d+)(?: \(turn \d+\))?: .+ \[(?P<reason>[a-z0-9_]+)\]; "
    r"fix the row, or set data\.on_bad_row=skip"
)


@pytest.fixture(scope="module", autouse=True)
def quiet_datasets():
    """No progress bars from writing the fuzz tables: they would bury the output of a failure."""
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


# ------------------------------------------------------------------------------------------ catalogue
@functools.cache
def code_points() -> dict[str, list[str]]:
    """Every code point by Unicode general category (``Cs`` surrogates, ``Cn`` unassigned, ...), in one pass."""
    out: dict[str, list[str]] = {}
    for c in range(sys.maxunicode + 1):
        out.setdefault(unicodedata.category(chr(c)), []).append(chr(c))
    return out


CATEGORIES = ("Cs", "Co", "Cc", "Cn", "Cf", "Zs", "Zl", "Zp", "Mn", "Me", "Lo", "So", "Sk", "Nd", "Lu", "Ll")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
HOSTILE_TEXTS = (
    "",
    " ",
    "\t\r\n",
    "\ufeff",
    "\ufeffhello",
    "\ud800",
    "a\udfffb",
    "\udc00\ud800",
    "\ud83d\ude00",  # the two halves of an emoji as separate code points: still lone surrogates in a str
    "\x00",
    "nul\x00inside",
    "\x1b[31mred\x1b[0m",
    "\x7f\x85\u2028\u2029",
    "carriage\rreturn",
    "\ufffe\uffff",
    "\U0010ffff\U000f0000\ue000",
    "e" + "\u0301" * 300,
    "\u202eevil\u202c",
    "\u200b\u200c\u200d",
    "{{ messages }}{% for m in messages %}x{% endfor %}",
    "{{ raise_exception('boom') }}",
    "<|im_end|>",
    "<|im_start|>assistant\nhi<|im_end|>",
    "<|endoftext|>",
    "\\u0000 \\ud800 not escapes once decoded",
    '"quoted" and \\ backslashed',
    "word " * 400,  # tokenizes far past too_long_factor * max_seq_len
    "\U0001f600" * 300,
)
GOOD_TEXTS = ("Say hi.", "Translate: chat", "Bonjour.", "Résumé 42", "日本語のテキスト", "ok")
ROLES = ("system", "user", "assistant", "tool", "", "User", "gpt", "human")
# JSON value texts that are not what ``json.dumps`` writes: non-standard, extreme or broken.
RAW_VALUES = (
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e999",
    b"1" * (MAX_NUMBER_CHARS + 1),
    b"1" * MAX_NUMBER_CHARS,
    b"9" * 5000,  # over Python's own int-string limit (4300 digits)
    b"0." + b"1" * 3000,
    b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    b"[" * (MAX_JSON_DEPTH - 2) + b"]" * (MAX_JSON_DEPTH - 2),
    b"[" * 5000 + b"]" * 5000,
    b"{" + b'"a": {' * 3000 + b"}" * 3001,
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"\\ud83d\\ude00"',  # a valid surrogate pair: the emoji
    b'"tab\there"',  # a raw control character inside a JSON string
    b'"\\x41"',
    b"tru",
    b"'single'",
    b"0x10",
    b"01",
    b".5",
    b"+1",
    b'{"a": 1, "a": 2}',
    b'"caf\xe9"',  # latin-1 in a UTF-8 file
    b'"\xc0\x80"',  # an overlong NUL
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8 (CESU-8)
    b'"\xf8\x88\x80\x80\x80"',  # a five-byte sequence
    b'"\xef\xbb\xbfBOM inside a string"',
)
# Structural JSON text that an array's item scan would take as brackets, commas or strings.
ARRAY_BREAKERS = (b"[" * 5000, b'"unterminated', b"[", b"]", b"{", b"}", b",", b'"')
JUNK_ALPHABET = bytes(range(256))


class Hostile:
    """Seeded hostile rows for every source format; the same seed gives the same bytes."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def random_text(self) -> str:
        """Up to 30 characters drawn from every Unicode category, surrogates and unassigned included."""
        rng = self.rng
        return "".join(rng.choice(code_points()[rng.choice(CATEGORIES)]) for _ in range(rng.randint(0, 30)))

    def text(self) -> str:
        roll = self.rng.random()
        if roll < 0.35:
            return self.rng.choice(GOOD_TEXTS)
        if roll < 0.7:
            return self.rng.choice(HOSTILE_TEXTS)
        return self.random_text()

    def junk(self, breakers: bool = True) -> bytes:
        """Random bytes: raw invalid UTF-8 and control bytes; without JSON structure unless ``breakers``."""
        out = bytes(self.rng.choice(JUNK_ALPHABET) for _ in range(self.rng.randint(1, 40)))
        if not breakers:
            out = out.translate(None, b'"[]{},\\\n')
        return out.replace(b"\n", b" ")

    def json_value(self, breakers: bool) -> bytes:
        """The JSON text of a hostile value: encoded text (escaped or raw), another type, or raw literals."""
        roll = self.rng.random()
        if roll < 0.55:
            text = self.text()
            escaped = self.chance(0.5)  # \ud800 escapes stay valid JSON; raw surrogates become invalid UTF-8
            return json.dumps(text, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
        if roll < 0.75:
            value = self.rng.choice([None, True, 0, -1, 3.5, [], {}, ["a"], {"role": "user"}, [[["x"]]]])
            return json.dumps(value).encode()
        if roll < 0.97 or not breakers:
            return self.rng.choice(RAW_VALUES)
        return self.rng.choice(ARRAY_BREAKERS)

    def json_key(self) -> bytes:
        return json.dumps(self.random_text()).encode("utf-8", "surrogatepass")

    def json_object(self, fmt: str, breakers: bool) -> bytes:
        """A row object in format ``fmt`` (``alpaca`` or ``chat``) with hostile keys and values."""
        pairs: list[tuple[bytes, bytes]] = []
        if fmt == "alpaca":
            for key in ("instruction", "input", "output", "system"):
                if self.chance(0.9 if key != "system" else 0.3):
                    pairs.append((json.dumps(key).encode(), self.json_value(breakers)))
        else:
            pairs.append((b'"messages"', self.turns(breakers)))
        if self.chance(0.15):
            pairs.append((self.json_key(), self.json_value(breakers)))
        if pairs and self.chance(0.05):
            pairs.append(self.rng.choice(pairs))  # a duplicate key
        self.rng.shuffle(pairs)
        return b"{" + b", ".join(k + b": " + v for k, v in pairs) + b"}"

    def turns(self, breakers: bool) -> bytes:
        if self.chance(0.1):
            return self.json_value(breakers)
        turns = []
        for i in range(self.rng.randint(0, 5)):
            role = json.dumps(self.rng.choice(ROLES) if self.chance(0.85) else self.text()).encode(
                "utf-8", "surrogatepass"
            )
            if self.chance(
                0.7
            ):  # mostly user / assistant turns that end with an answer: they reach the tokenizer
                role = b'"user"' if i % 2 == 0 else b'"assistant"'
            content = self.json_value(breakers) if self.chance(0.6) else json.dumps(self.text()).encode()
            turns.append(b'{"role": ' + role + b', "content": ' + content + b"}")
        return b"[" + b", ".join(turns) + b"]"

    @staticmethod
    def good_object(fmt: str, i: int) -> dict:
        if fmt == "alpaca":
            return {"instruction": f"Say {i}.", "input": "", "output": f"{i}"}
        return {
            "messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]
        }

    def line(self, fmt: str) -> tuple[bytes, bool]:
        """One JSON Lines line and whether it is a row (blank lines are not)."""
        roll = self.rng.random()
        if roll < 0.04:
            return self.rng.choice([b"", b"   ", b"\t"]), False
        if roll < 0.10:
            return self.junk(), True
        if roll < 0.14:  # a byte-order mark where two files were joined
            return b"\xef\xbb\xbf" + json.dumps(self.good_object(fmt, 0)).encode(), True
        if roll < 0.18:  # a whole row in latin-1
            row = {"instruction": "café", "output": "ça va"} if fmt == "alpaca" else self.good_object(fmt, 1)
            return json.dumps(row, ensure_ascii=False).encode("latin-1", "replace") + b"\r", True
        if roll < 0.22:
            return self.rng.choice([b"[1, 2]", b'"a string"', b"42", b"null", b"{}", b"[]"]), True
        line = self.json_object(fmt, breakers=True)
        if self.chance(0.05):
            line = line[: self.rng.randint(0, len(line))]  # cut short
            return line, bool(line.strip())
        return line, True

    def csv_field(self) -> str:
        roll = self.rng.random()
        if roll < 0.4:
            return self.rng.choice(GOOD_TEXTS)
        if roll < 0.8:
            return self.rng.choice(HOSTILE_TEXTS)
        return self.random_text()

    def csv_line(self, header: list[str]) -> bytes:
        roll = self.rng.random()
        if roll < 0.08:
            return self.junk()
        if roll < 0.12:
            return b"\xef\xbb\xbf" + ",".join(header).encode()  # a second file's header, BOM and all
        if roll < 0.16:
            return "café,,ça va".encode("latin-1")
        if roll < 0.20:
            return b'a,"quoted" in the middle,b'
        fields = [self.csv_field() for _ in range(len(header) + self.rng.choice([0, 0, 0, 0, 1, -1]))]
        text = ",".join(_csv_quote(f) if self.chance(0.8) else f for f in fields)
        return text.encode("utf-8", "surrogatepass")


def _csv_quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


# -------------------------------------------------------------------------------------- source files
def write_jsonl(folder: Path, gen: Hostile, fmt: str, n: int) -> tuple[list[Path], int]:
    """A JSON Lines file of ``n`` hostile lines (one good row in four, the first ones good) and one line
    over :data:`MAX_ROW_BYTES`; returns the files and how many rows they hold."""
    lines, rows = [], 0
    for i in range(n):
        line, is_row = (json.dumps(gen.good_object(fmt, i)).encode(), True) if i % 4 == 0 else gen.line(fmt)
        lines.append(line)
        rows += is_row
    lines.insert(len(lines) // 2, b'{"output": "' + b"x" * MAX_ROW_BYTES + b'"}')
    path = folder / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return [path], rows + 1


def write_json(folder: Path, gen: Hostile, fmt: str, n: int) -> tuple[list[Path], int]:
    """A ``.json`` array of ``n`` hostile items that keep the array's own structure intact."""
    items = []
    for i in range(n):
        roll = gen.rng.random()
        if i % 4 == 0:
            item = json.dumps(gen.good_object(fmt, i), indent=1).encode()
        elif roll < 0.06:
            item = gen.junk(breakers=False) or b"x"
        elif roll < 0.1:
            item = b"\xef\xbb\xbf" + json.dumps(gen.good_object(fmt, i)).encode()
        else:
            item = gen.json_object(fmt, breakers=False)
        items.append(item)
    items.insert(len(items) // 2, b'{"output": "' + b"x" * MAX_ROW_BYTES + b'"}')
    path = folder / "hostile.json"
    path.write_bytes(b"[\n" + b",\n".join(items) + b"\n]\n")
    return [path], len(items)


def write_csv(folder: Path, gen: Hostile, fmt: str, n: int) -> tuple[list[Path], None]:
    """A CSV file of ``n`` hostile lines; the last one opens a quote that is never closed."""
    header = ["instruction", "input", "output"]
    lines = [",".join(header).encode()]
    for i in range(n):
        lines.append(f"Say {i}.,,{i}".encode() if i % 4 == 0 else gen.csv_line(header))
    lines.insert(len(lines) // 2, b"a,b," + b"x" * MAX_ROW_BYTES)
    lines.append(b'"never closed,a,b')
    path = folder / "hostile.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return [path], None  # quoting decides how many records the lines hold


def _table_variants(gen: Hostile, fmt: str, n: int) -> list[tuple[str, dict, datasets.Features]]:
    """Columns of hostile values, one typed variant each (an arrow column holds one type)."""

    def storable(text: str | None) -> str | None:
        # Arrow stores UTF-8: a str with a lone surrogate cannot even be written to a table.
        if text is not None:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return "?"
        return text

    def maybe_none(make):
        return None if gen.chance(0.1) else make()

    string = datasets.Value("string")
    k = max(1, n // 6)  # six variants' worth of rows in all: n rows
    if fmt == "alpaca":
        texts = {
            name: [Hostile.good_object(fmt, i)[name] if i % 4 == 0 else maybe_none(lambda: storable(gen.text())) for i in range(2 * k)]
            for name in ("instruction", "input", "output")
        }  # fmt: skip
        texts["output"][k] = "x" * (MAX_ROW_BYTES + 1)
        return [
            ("texts", texts, datasets.Features({name: string for name in texts})),
            (
                "typed",  # the answer a float (NaN and infinities included), the input a bool
                {
                    "instruction": [gen.rng.choice(GOOD_TEXTS) for _ in range(k)],
                    "output": [gen.rng.choice([math.nan, math.inf, -math.inf, 1e308, 0.5]) for _ in range(k)],
                    "input": [gen.chance(0.5) for _ in range(k)],
                },
                datasets.Features(
                    {"instruction": string, "output": datasets.Value("float64"), "input": datasets.Value("bool")}
                ),
            ),
            (
                "lists",  # the instruction a list of text, the answer a 64-bit integer
                {
                    "instruction": [[storable(gen.text())] for _ in range(k)],
                    "output": [gen.rng.randint(-(2**62), 2**62) for _ in range(k)],
                },
                datasets.Features({"instruction": datasets.List(string), "output": datasets.Value("int64")}),
            ),
            (
                "image",
                {"instruction": ["Say hi."] * k, "output": ["hi"] * k, "picture": [{"bytes": b"not an image", "path": None}] * k},
                datasets.Features({"instruction": string, "output": string, "picture": datasets.Image()}),
            ),
            (
                "binary",
                {"instruction": [gen.junk() for _ in range(k)], "output": ["hi"] * k},
                datasets.Features({"instruction": datasets.Value("binary"), "output": string}),
            ),
        ]  # fmt: skip
    turn = {"role": string, "content": string}

    def turns(i: int) -> list[dict]:
        if i % 4 == 0:
            return Hostile.good_object(fmt, i)["messages"]
        return [
            {"role": maybe_none(lambda: storable(gen.rng.choice(ROLES))), "content": maybe_none(lambda: storable(gen.text()))}
            for _ in range(gen.rng.randint(0, 4))
        ]  # fmt: skip

    messages = [turns(i) for i in range(4 * k)]
    messages[k] = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x" * (MAX_ROW_BYTES + 1)},
    ]
    return [
        ("chat", {"messages": messages}, datasets.Features({"messages": datasets.List(turn)})),
        (
            "flat",
            {"messages": [storable(gen.text()) for _ in range(k)]},
            datasets.Features({"messages": string}),
        ),
        (
            "legacy",  # datasets' Sequence of a dict: a dict of lists per row, not a list of turns
            {"messages": [{"role": ["user", "assistant"], "content": ["q", "a"]}] * k},
            datasets.Features({"messages": datasets.Sequence(turn)}),
        ),
    ]


def write_parquet(folder: Path, gen: Hostile, fmt: str, n: int) -> tuple[list[Path], int]:
    paths, rows = [], 0
    for name, columns, features in _table_variants(gen, fmt, n):
        path = folder / f"{name}.parquet"
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
        paths.append(path)
        rows += len(next(iter(columns.values())))
    return paths, rows


def write_saved(folder: Path, gen: Hostile, fmt: str, n: int) -> tuple[list[Path], int]:
    paths, rows = [], 0
    for name, columns, features in _table_variants(gen, fmt, n):
        path = folder / name
        dataset = datasets.Dataset.from_dict(columns, features=features)
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(path))
        paths.append(path)
        rows += len(dataset)
    return paths, rows


WRITERS = {
    "jsonl": write_jsonl,
    "json": write_json,
    "csv": write_csv,
    "parquet": write_parquet,
    "saved": write_saved,
}


# --------------------------------------------------------------------------------------------- checks
@functools.cache
def data_config(fmt: str, policy: str) -> DataConfig:
    """The ``data`` config training composes for ``data=files`` with these settings (composed once:
    Hydra takes longer than reading a small file); the source is filled in per test."""
    cfg = to_train_config(
        compose_train(
            [*TINY, "output_dir=/tmp/unused", "data=files", "data.source=unset.jsonl", f"data.format={fmt}",
             f"data.on_bad_row={policy}", "data.cache=false", f"data.max_seq_len={MAX_SEQ_LEN}",
             "data.val_fraction=0.1", "data.test_fraction=0"]
        )
    )  # fmt: skip
    return cfg.data


def data_module(tmp_path: Path, tokenizer, sources: list[Path], fmt: str, policy: str) -> DataModule:
    cfg = dataclasses.replace(data_config(fmt, policy), source=[str(p) for p in sources])
    return DataModule(cfg, tokenizer, tmp_path / f"data-{policy}")


def check_skip(module: DataModule, rows: int | None) -> dict:
    """After ``setup()`` under ``skip``: every row read is kept, bad (by a named reason) or dropped, and
    every kept example is well masked."""
    stats = module.stats
    kept = sum(stats["examples"].values())
    bad = sum(stats["bad_rows"].values())
    assert stats["rows_read"] == kept + bad + stats["dropped_no_trained_token"], stats
    if rows is not None:
        assert stats["rows_read"] == rows, stats
    assert set(stats["bad_rows"]) <= KNOWN_REASONS, stats["bad_rows"]
    assert all("\n" not in where for where in stats["first_of_each"].values())
    for split in module.examples.values():
        for example in split:
            ids, labels = example["input_ids"], example["labels"]
            assert len(ids) == len(labels) <= MAX_SEQ_LEN and count_trained(labels) >= 1
            assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    return stats


def check_fail(err: UserError, sources: list[Path], reasons: set[str]) -> None:
    """A ``fail`` stop: one line naming a row of one of ``sources`` and a reason ``skip`` also counted."""
    message = str(err)
    assert "\n" not in message and message.isprintable(), repr(message[:300])
    match = BAD_ROW_LINE.match(message)
    assert match, message[:300]
    assert any(match["source"].startswith(str(path)) for path in sources), message[:300]
    assert match["reason"] in reasons, (match["reason"], reasons)


CASES = [
    ("jsonl", "alpaca"),
    ("jsonl", "chat"),
    ("json", "alpaca"),
    ("json", "chat"),
    ("csv", "alpaca"),
    ("parquet", "alpaca"),
    ("parquet", "chat"),
    ("saved", "alpaca"),
    ("saved", "chat"),
]


@pytest.mark.parametrize(("source", "fmt"), CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_hostile_rows_never_escape_as_anything_but_bad_rows(tmp_path, tokenizer, source, fmt):
    gen = Hostile(FUZZ_SEED + CASES.index((source, fmt)))
    folder = tmp_path / "sources"
    folder.mkdir()
    paths, rows = WRITERS[source](folder, gen, fmt, FUZZ_ROWS)

    skipping = data_module(tmp_path, tokenizer, paths, fmt, "skip")
    skipping.setup()  # raises nothing: every row is kept or counted
    stats = check_skip(skipping, rows)
    print(
        f"{source}/{fmt}: {stats['rows_read']} rows, {sum(stats['examples'].values())} kept, bad {stats['bad_rows']}"
    )
    assert stats["bad_rows"] and sum(stats["examples"].values()) > 0  # the draw did reach both outcomes

    with pytest.raises(UserError) as raised:
        data_module(tmp_path, tokenizer, paths, fmt, "fail").setup()
    check_fail(raised.value, paths, set(stats["bad_rows"]))


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (b'[{"a": 1},\n {"b": 2}', 2),
        (b'[\n{"a": 1}]\n]', 3),
        (b'[{"a": 1},\n,\n{"b": 2}]', 2),
        (b'[{"a": 1},\n]', 2),
        (b'[\n{"a": 1},\n{"b": "unterminated}]\n', 3),
        (b"[" * 100_000, 1),
    ],
)
def test_a_broken_json_array_stops_with_one_line_naming_its_line(tmp_path, text, line):
    """Past a broken bracket or quote no item boundary can be trusted: the file, not a row, is refused."""
    path = tmp_path / "broken.json"
    path.write_bytes(text)
    for policy in ("skip", "fail"):
        with pytest.raises(
            UserError, match=rf"^{re.escape(str(path))}:{line}: not a valid JSON array \("
        ) as raised:
            read_json(path, BadRows(policy))
        assert "\n" not in str(raised.value)


# -------------------------------------------------------------------------------- property (hypothesis)
every_character = st.characters(codec=None, categories=None)  # all categories, surrogates (Cs) included
rare_characters = st.characters(categories=["Cs", "Co", "Cc", "Cn", "Cf", "Zl", "Zp"])
any_text = st.text(st.one_of(every_character, rare_characters), max_size=30)
any_value = st.one_of(
    any_text,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(any_text, max_size=3),
    st.dictionaries(any_text, any_text, max_size=2),
)
turn = st.fixed_dictionaries(
    {}, optional={"role": st.one_of(st.sampled_from(ROLES), any_value), "content": any_value}
)
any_row = st.one_of(
    st.fixed_dictionaries({}, optional={"instruction": any_value, "input": any_value, "output": any_value, "system": any_value}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(turn, max_size=4), any_value)}),
    any_value,
)  # fmt: skip


@settings(
    max_examples=max(20, FUZZ_ROWS // 10),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(any_row, min_size=1, max_size=6),
    fmt=st.sampled_from(["alpaca", "chat"]),
    escaped=st.booleans(),
)
def test_any_text_of_any_category_is_a_row_or_a_bad_row(tmp_path_factory, tokenizer, rows, fmt, escaped):
    """Arbitrary JSON rows (NaN and Infinity from ``json.dumps`` too), written with surrogates as
    ``\\ud800`` escapes or as raw (invalid UTF-8) bytes, after a good row so that setup can succeed."""
    tmp_path = tmp_path_factory.mktemp("prop")
    lines = [json.dumps(Hostile.good_object(fmt, 0)).encode()]
    lines += [json.dumps(row, ensure_ascii=escaped).encode("utf-8", "surrogatepass") for row in rows]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines))
    module = data_module(tmp_path, tokenizer, [path], fmt, "skip")
    module.setup()
    check_skip(module, len(lines))
    failing = data_module(tmp_path, tokenizer, [path], fmt, "fail")
    try:
        failing.setup()
    except UserError as err:
        check_fail(err, [path], set(module.stats["bad_rows"]))
    else:
        assert not module.stats["bad_rows"] and failing.examples == module.examples


# ------------------------------------------------------------------------------------------------ CLI
def test_the_cli_trains_past_hostile_rows_and_fails_in_one_line(tmp_path):
    """``python -m lit_lora.train`` on a hostile JSON Lines file: ``skip`` trains (exit 0), ``fail``
    stops before training with one line naming the first bad row (exit 2), never a traceback."""
    gen = Hostile(FUZZ_SEED)
    lines = [json.dumps(Hostile.good_object("alpaca", i)).encode() for i in range(40)]
    lines += [gen.line("alpaca")[0] for _ in range(60)]
    lines += [
        b'{"instruction": "\\ud800", "output": "x"}',
        b"[" * 100_000,
        b'{"output": ' + b"9" * 5000 + b"}",
    ]
    gen.rng.shuffle(lines)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    common = [
        *TINY,
        "data=files",
        f"data.source='{path}'",
        "data.cache=false",
        "trainer.max_steps=2",
        "score=false",
    ]

    # The two runs start in parallel: each spends most of its time importing torch and lightning.
    with ThreadPoolExecutor(2) as pool:
        skipped, failed = pool.map(
            lambda policy: run_cli(*common, f"data.on_bad_row={policy}", f"output_dir={tmp_path / policy}", timeout=300),
            ("skip", "fail"),
        )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "Traceback" not in skipped.stderr
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("lit-lora: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"lit-lora: error: {path}:"), failed.stderr[-2000:]
    assert BAD_ROW_LINE.match(errors[0].removeprefix("lit-lora: error: ")), errors[0]
