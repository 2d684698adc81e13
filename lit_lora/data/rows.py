"""Reading and validating rows: files, globs, ``save_to_disk`` folders and hub datasets -> :class:`Row`.

Where rows come from (``data.source``, ``data.val_source``, ``data.test_source``):

- a file or a glob of files: ``.jsonl``, ``.json`` (an array of objects, or JSON lines), ``.csv``, ``.parquet``;
  a list mixes several;
- a folder written by ``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` with train / validation / test);
- a folder holding ``train.*``, and optionally ``val.*`` (or ``validation.*``) and ``test.*`` files;
- ``hf:<dataset id>`` with ``data.hub_split`` and ``data.hub_subset`` (needs the hub; offline it fails at once).

JSON, JSON Lines and CSV are parsed here, row by row, because that is the only way to name the
``file:line`` of a bad row and to catch what a columnar reader hides (duplicate keys, a row whose field
changes type). Parquet, saved and hub datasets are read by the ``datasets`` library, in batches, and a
batch that fails to decode is read again row by row so that only its bad rows are lost.

Every row is checked against ``data.format`` and becomes a conversation (``Row.messages``) or a raw
text (``Row.text``). A bad row is reported through :class:`BadRows`: with ``on_bad_row=fail`` the first
one stops the run with its location and reason; with ``skip`` it is left out and counted by reason.
A UTF-8 byte-order mark (at the start of a file, or of a later line, as concatenating files leaves
it) and CRLF line ends are read transparently and noted, not counted as bad.

Containment: whatever one row holds, reading, parsing and validating it either yields a :class:`Row`
or reports that row to :class:`BadRows` (so ``fail`` raises one :class:`UserError` line naming it, and
``skip`` counts it); only problems of a whole source (a missing file, a CSV without a header, a
``.json`` array whose brackets do not balance) raise :class:`UserError` for the source. Structural
extremes are refused before the parser sees them, by the limits below, so no row can exhaust the
recursion limit, the int-string limit or memory; text the tokenizer cannot take is refused here
(``unencodable_text``) rather than failing in the tokenizer.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_lora.errors import UserError

FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion", "text", "preference")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
}
CHAT_ROLES = ("system", "user", "assistant")
HUB_PREFIX = "hf:"

# ------------------------------------------------------------------------------------------- limits
# One row (a JSON Lines or CSV line, an item of a .json array) may hold at most this many bytes, and
# one text field of a row from any reader at most this many characters. A 128k-token document is
# about 0.5 MB of text, 3 MB at worst once JSON escapes every character as \uXXXX: 16 MiB leaves a
# wide margin for real long-context rows while keeping one row's parse and tokenization to seconds
# and its memory to tens of MB. Longer is a bad row (``row_too_large``), refused before decoding.
MAX_ROW_BYTES = 16 * 1024 * 1024
# JSON nesting deeper than this is a bad row (``too_deep``), found by a scan before parsing. Real rows
# nest a handful of levels (row -> messages -> turn -> tool arguments); Python's JSON parser recurses
# once per level and raises RecursionError near 1000, which this keeps far away.
MAX_JSON_DEPTH = 64
# A JSON number literal longer than this is a bad row (``bad_number``), as is one out of float range
# (``1e400``). 640 is the smallest int-string limit Python can be configured with
# (``sys.set_int_max_str_digits``), so ``int()`` of an accepted literal never raises and stays linear.
MAX_NUMBER_CHARS = 640
# Rows decoded per batch from a ``datasets`` table; a batch that fails is decoded again row by row.
DATASET_BATCH = 1000


@dataclass
class Row:
    """One validated row: ``loc`` is where it came from (``file:line`` or ``file:row N``).

    A preference row holds two conversations with the same prompt: ``messages`` ends with the chosen
    answer, ``rejected`` with the rejected one."""

    loc: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    rejected: list[dict[str, str]] | None = None

    def to_json(self) -> dict:
        return {"loc": self.loc, "messages": self.messages, "text": self.text, "rejected": self.rejected}


def one_line(text: str) -> str:
    """``text`` safe to print as part of one line: line breaks, control characters and lone surrogates
    (which no terminal or UTF-8 file can take) become their backslash escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def show(value: str, limit: int = 60) -> str:
    """A quoted, escaped and shortened ``value`` for a message (a row's value can be megabytes long)."""
    shown = repr(value[:limit])
    return shown if len(value) <= limit else shown + "..."


def describe(err: BaseException) -> str:
    """``Type: first line of the message`` of an unexpected exception, printable on one line."""
    lines = str(err).strip().splitlines()
    first = one_line(lines[0][:200]) if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def unencodable(text: str) -> str | None:
    """Why the tokenizer cannot take ``text``, or None if it can.

    A Python str reaches the (Rust) tokenizer as UTF-8, so exactly the strings that do not encode to
    UTF-8 are refused: those holding a lone UTF-16 surrogate (U+D800..U+DFFF), which a valid JSON
    escape such as ``"\\ud800"`` produces. Everything else, private-use, unassigned and control
    characters included, encodes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"a lone UTF-16 surrogate U+{ord(text[err.start]):04X} at character {err.start + 1}"
    return None


@dataclass
class BadRows:
    """Bad-row policy and bookkeeping: ``fail`` raises on the first, ``skip`` counts by reason."""

    policy: str = "fail"
    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, loc: str, reason: str, detail: str) -> None:
        """Report the bad row at ``loc``: raises :class:`UserError` (one line) under ``fail``, else counts it."""
        where = f"{one_line(loc)}: {one_line(detail)}"
        if self.policy == "fail":
            raise UserError(
                f"{where} [{reason}]; fix the row, or set data.on_bad_row=skip to train on the good rows"
            )
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)


# ------------------------------------------------------------------------------------------ sources
def is_saved_dataset(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def split_files(folder: Path) -> dict[str, list[Path]]:
    """``train`` / ``val`` / ``test`` files of a split folder (``validation.*`` counts as val)."""
    out: dict[str, list[Path]] = {}
    for split, stems in (("train", ("train",)), ("val", ("val", "validation")), ("test", ("test",))):
        found = [folder / f"{stem}{ext}" for stem in stems for ext in EXTENSIONS]
        found = [p for p in found if p.is_file()]
        if found:
            out[split] = found
    return out


def expand_files(spec: str) -> list[Path]:
    """Files named by a path or a glob; a :class:`UserError` when nothing matches or a type is unknown."""
    paths = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise UserError(f"data source {spec!r} matches no file")
    for path in paths:
        if path.suffix.lower() not in EXTENSIONS:
            raise UserError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
    return paths


def source_list(spec: Any) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return [str(s) for s in spec]


# ---------------------------------------------------------------------------------------- JSON family
class _Skip(Exception):
    """Raised after a bad row is counted (``skip`` policy) to abandon that row."""


class _RowFlaw(Exception):
    """Raised by a JSON parse hook: the row holds a value refused here (``reason``, ``detail``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _object(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _RowFlaw("duplicate_key", f"key {show(key)} appears twice in the row")
        seen[key] = value
    return seen


def _constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which JSON (RFC 8259) does not have.
    raise _RowFlaw("invalid_json", f"not valid JSON ({name} is not a JSON value; write null or a string)")


def _int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _RowFlaw("bad_number", f"a number of {len(literal):,} characters, over {MAX_NUMBER_CHARS}")
    return int(literal)


def _float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _RowFlaw("bad_number", f"a number of {len(literal):,} characters, over {MAX_NUMBER_CHARS}")
    value = float(literal)
    if math.isinf(value):  # 1e400: float() rounds it to infinity without a word
        raise _RowFlaw("bad_number", f"the number {show(literal)} is out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_int=_int, parse_float=_float
)
# A JSON string, or a bracket (and, in an array, a comma). A string always matches from its opening
# quote, to its closing one or, unclosed, to the end of the text (group ``closed`` unset), so each
# character is scanned once: broken quoting cannot make the scan quadratic.
_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*(?:(?P<closed>")|\\?\Z)'
_STRUCTURE = re.compile(_STRING + r"|[\[\]{}]", re.DOTALL)
_ARRAY_STRUCTURE = re.compile(_STRING.encode() + rb"|[\[\]{},]", re.DOTALL)
_JSON_SPACE = b" \t\r\n"
_JSON_SPACE_RUN = re.compile(rb"[ \t\r\n]*")


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests brackets deeper than ``limit`` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= limit:
        return False  # fewer openers than the limit: cannot nest deeper (the usual case, no scan)
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _text_of(path: Path, bad: BadRows) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:  # gone since the glob, unreadable, a folder: the source, not a row
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from err
    if data.startswith(b"\xef\xbb\xbf"):
        bad.note(f"{path}: UTF-8 byte-order mark ignored")
        data = data[3:]
    if b"\r\n" in data:
        bad.note(f"{path}: CRLF line ends read as LF")
    return data


class _JsonRows:
    """Parses the rows of one JSON or JSON Lines file, each on its own, within the limits above."""

    def __init__(self, path: Path, bad: BadRows):
        self.path, self.bad = path, bad
        self.bom_noted = False

    def strip_bom(self, text: str, loc: str) -> str:
        """``text`` without a leading U+FEFF, which concatenating files with byte-order marks leaves
        at the start of a later line: noted once per file, the row is read as if it were absent."""
        if not text.startswith("\ufeff"):
            return text
        if not self.bom_noted:
            self.bom_noted = True
            self.bad.note(f"{loc}: byte-order mark at the start of the row ignored (files joined together?)")
        return text[1:]

    def parse(self, raw: bytes, loc: str, too_deep: bool | None = None) -> dict | None:
        """The object of one row's bytes, or None after reporting why it is bad.

        ``too_deep``: the caller's depth verdict when it has already scanned the bytes, else None.
        """
        bad = self.bad
        if len(raw) > MAX_ROW_BYTES:
            bad.add(
                loc, "row_too_large", f"{len(raw):,} bytes, over the limit of {MAX_ROW_BYTES:,} for one row"
            )
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.add(
                loc, "invalid_utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at column {err.start + 1}"
            )
            return None
        text = self.strip_bom(text, loc)
        if too_deep if too_deep is not None else json_too_deep(text):
            bad.add(loc, "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return None
        try:
            obj = _DECODER.decode(text)
        except _RowFlaw as flaw:
            bad.add(loc, flaw.reason, flaw.detail)
            return None
        except json.JSONDecodeError as err:
            bad.add(loc, "invalid_json", f"not valid JSON ({err.msg}, column {err.colno})")
            return None
        except RecursionError:  # the depth scan should have caught it: kept as a second line of defence
            bad.add(loc, "too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return None
        if not isinstance(obj, dict):
            bad.add(loc, "not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")
            return None
        return obj

    def lines(self, data: bytes) -> list[tuple[str, dict]]:
        """``(file:line, object)`` of every good line; blank lines are skipped."""
        out = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            raw = raw.rstrip(b"\r")
            if not raw.strip() or raw.strip() == b"\xef\xbb\xbf":
                continue
            loc = f"{self.path}:{number}"
            obj = _contained(self.bad, loc, self.parse, raw, loc)
            if obj is not None:
                out.append((loc, obj))
        return out

    def array(self, data: bytes, start: int) -> list[tuple[str, dict]]:
        """``(file:line (item N), object)`` of every good item of the array opening at ``data[start]``.

        The array is split into items by a scan of its brackets, commas and strings, and each item is
        parsed on its own: a broken item is one bad row, not a broken file. Only a broken array
        (unbalanced brackets, an unclosed string, an empty item, text after it) stops the source,
        naming its line, because past it no item boundary can be trusted.
        """
        out = []
        for number, (line, first, end, depth) in enumerate(self._items(data, start), start=1):
            loc = f"{self.path}:{line} (item {number})"
            obj = _contained(self.bad, loc, self.parse, data[first:end], loc, depth > MAX_JSON_DEPTH)
            if obj is not None:
                out.append((loc, obj))
        return out

    def _items(self, data: bytes, start: int) -> list[tuple[int, int, int, int]]:
        """``(line, start, end, depth)`` of each top-level item of the array at ``data[start]``."""
        depth, deepest, first = 0, 0, start + 1
        spans: list[tuple[int, int, int]] = []
        end = None
        match = None
        for match in _ARRAY_STRUCTURE.finditer(data, start):
            char = data[match.start()]
            if char == ord('"'):
                continue
            if char in b"[{":
                depth += 1
                deepest = max(deepest, depth - 1)  # the array's own bracket is not the item's depth
            elif char in b"]}":
                depth -= 1
                if depth == 0:
                    spans.append((first, match.start(), deepest))
                    end = match.end()
                    break
            elif char == ord(",") and depth == 1:
                spans.append((first, match.start(), deepest))
                first, deepest = match.end(), 0
        if end is None:
            if match is not None and data[match.start()] == ord('"') and match["closed"] is None:
                raise self._broken(data, match.start(), "a string that starts here is never closed")
            where = _JSON_SPACE_RUN.match(data, first).end()
            raise self._broken(data, where, "it is never closed: a ] or } is missing from here on")
        trailing = data[end:].lstrip(_JSON_SPACE)
        if trailing:
            raise self._broken(data, len(data) - len(trailing), "text after the end of the array")
        if len(spans) == 1 and not data[spans[0][0] : spans[0][1]].strip(_JSON_SPACE):
            return []  # []
        items, line, counted = [], 1, 0
        for first, last, depth_of_item in spans:
            body = data[first:last]
            stripped = body.strip(_JSON_SPACE)
            if not stripped:
                raise self._broken(data, last, "an empty item: two commas in a row, or a comma before ]")
            begin = first + len(body) - len(body.lstrip(_JSON_SPACE))
            line += data.count(b"\n", counted, begin)
            counted = begin
            items.append((line, begin, begin + len(stripped), depth_of_item))
        return items

    def _broken(self, data: bytes, at: int, why: str) -> UserError:
        line = data.count(b"\n", 0, at) + 1
        return UserError(f"{self.path}:{line}: not a valid JSON array ({why}); the file cannot be read")


def _contained(bad: BadRows, loc: str, read, *args, reason: str = "unreadable_row"):
    """``read(*args)``, with any unexpected exception turned into the bad row ``reason`` at ``loc``:
    one row's failure must not end the run. :class:`UserError` (the ``fail`` policy) passes through."""
    try:
        return read(*args)
    except UserError:
        raise
    except Exception as err:
        bad.add(loc, reason, describe(err))
        return None


def read_jsonl(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """``(file:line, object)`` for every good line of a JSON Lines file; blank lines are skipped."""
    return _JsonRows(path, bad).lines(_text_of(path, bad))


def read_json(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """Rows of a ``.json`` file: an array of objects (located as ``file:line (item N)``), or JSON Lines."""
    data = _text_of(path, bad)
    start = len(data) - len(data.lstrip(_JSON_SPACE))
    reader = _JsonRows(path, bad)
    if data[start : start + 1] == b"[":
        return reader.array(data, start)
    return reader.lines(data)


# ---------------------------------------------------------------------------------------------- CSV
def read_csv(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """Rows of a CSV file with a header, every column read as text (``007`` stays ``007``).

    Parsed here with Python's csv module, record by record, so that a bad record (invalid UTF-8, the
    wrong number of fields, broken quoting, over :data:`MAX_ROW_BYTES`) is one bad row at its
    ``file:line`` and the next record is read normally. A record that repeats the header (files
    concatenated) is skipped and noted.
    """
    lines, numbers = [], []
    bom_noted = False
    for number, raw in enumerate(_text_of(path, bad).split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        loc = f"{path}:{number}"
        problem = None
        if len(raw) > MAX_ROW_BYTES:
            problem = (
                "row_too_large",
                f"{len(raw):,} bytes, over the limit of {MAX_ROW_BYTES:,} for one row",
            )
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = (
                    "invalid_utf8",
                    f"invalid UTF-8 byte 0x{raw[err.start]:02x} at column {err.start + 1}",
                )
        if problem and not lines:  # no header yet: without one no row can be read
            raise UserError(f"{loc}: the CSV header cannot be read ({problem[1]})")
        if problem:
            bad.add(loc, *problem)
            continue
        if text.startswith("\ufeff"):
            text = text[1:]
            if not bom_noted:
                bom_noted = True
                bad.note(f"{loc}: byte-order mark at the start of the line ignored (files joined together?)")
        lines.append(text + "\n")  # the newline keeps line breaks inside quoted fields
        numbers.append(number)
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_ROW_BYTES)  # the default, 128 KiB per field, is shorter than a JSON row may be
    try:
        return _csv_records(path, lines, numbers, bad)
    finally:
        csv.field_size_limit(limit)


def _csv_records(path: Path, lines: list[str], numbers: list[int], bad: BadRows) -> list[tuple[str, dict]]:
    reader = csv.reader(lines)
    try:
        header = next(reader, [])
    except csv.Error as err:
        raise UserError(f"{path}:{numbers[0]}: the CSV header is not valid CSV ({err})") from err
    if not header:
        raise UserError(f"{path}: a CSV file needs a header row naming its columns")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise UserError(f"{path}:{numbers[0]}: the CSV header names column {show(twice[0])} twice")
    out = []
    while True:
        first = reader.line_num  # index in ``lines`` of the record's first line
        loc = f"{path}:{numbers[min(first, len(numbers) - 1)]}"
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:  # the reader starts afresh on the next line
            bad.add(loc, "bad_csv_line", f"not valid CSV ({err})")
            continue
        if not record:
            continue
        if record == header:
            bad.note(f"{loc}: a repeated header line skipped (files joined together?)")
            continue
        if len(record) != len(header):
            header_text = show(",".join(header))
            bad.add(loc, "bad_csv_line", f"expected {len(header)} fields ({header_text}), got {len(record)}")
            continue
        out.append((loc, dict(zip(header, record, strict=True))))
    return out


# ------------------------------------------------------------------------------- datasets-read sources
def _dataset_rows(dataset, origin: str, bad: BadRows) -> list[tuple[str, dict]]:
    """``(origin:row N, row)`` of every row of a ``datasets.Dataset`` as plain Python values.

    Rows are decoded a batch at a time; when a batch fails (a corrupt image, text arrow cannot
    decode), its rows are decoded one by one and each failing row is the bad row ``undecodable_row``.
    """
    dataset = dataset.with_format(None)  # a saved torch / numpy format would hand over tensors
    out = []
    for first in range(0, len(dataset), DATASET_BATCH):
        last = min(first + DATASET_BATCH, len(dataset))
        try:
            batch = dataset[first:last]
            rows = [{name: batch[name][i] for name in batch} for i in range(last - first)]
        except Exception:  # arrow and feature decoders raise many types: find the row below
            rows = None
        for i in range(first, last):
            loc = f"{origin}:row {i + 1}"
            row = (
                rows[i - first]
                if rows is not None
                else _contained(bad, loc, dataset.__getitem__, i, reason="undecodable_row")
            )
            if row is not None:
                out.append((loc, row))
    return out


def read_parquet(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:
        raise UserError(f"{path}: cannot be read as Parquet: {describe_last(err)}") from err
    return _dataset_rows(dataset, str(path), bad)


def describe_last(err: BaseException) -> str:
    """The last line of a library's message (pandas and arrow put the cause there), on one line."""
    lines = str(err).strip().splitlines()
    return one_line(lines[-1][:300]) if lines else type(err).__name__


def read_file(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, bad)
    if suffix == ".json":
        return read_json(path, bad)
    if suffix == ".csv":
        return read_csv(path, bad)
    return read_parquet(path, bad)


def read_saved(folder: Path, bad: BadRows) -> dict[str, list[tuple[str, dict]]]:
    """Splits of a ``save_to_disk`` folder: a Dataset is all ``train``; a DatasetDict maps its splits."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise UserError(f"{folder}: cannot be read by datasets.load_from_disk: {describe_last(err)}") from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": _dataset_rows(loaded, str(folder), bad)}
    names = {"train": "train", "validation": "val", "val": "val", "test": "test"}
    out = {names[k]: _dataset_rows(v, f"{folder}/{k}", bad) for k, v in loaded.items() if k in names}
    if "train" not in out:
        raise UserError(f"{folder}: the saved DatasetDict has no 'train' split (it has {', '.join(loaded)})")
    return out


def read_hub(spec: str, split: str, subset: str | None, bad: BadRows) -> list[tuple[str, dict]]:
    """Rows of a hub dataset; fails in seconds, with the way out, when the hub cannot be reached."""
    from lit_lora.environment import hub_reachable

    name = spec[len(HUB_PREFIX) :]
    if not hub_reachable():
        raise UserError(
            f"data.source={spec} needs the Hugging Face hub, which cannot be reached from here; "
            "save the dataset elsewhere with datasets' save_to_disk (or as .jsonl/.parquet) and point data.source at it"
        )
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as err:
        raise UserError(f"data.source={spec}: {describe(err)}") from err
    return _dataset_rows(dataset, spec, bad)


# --------------------------------------------------------------------------------------- validation
def _field(
    obj: dict, name: str, loc: str, bad: BadRows, required: bool = True, kind: type | tuple[type, ...] = str
) -> Any:
    """The value of ``obj[name]`` if it has the right type (and is non-empty when required), else None.

    A text value must also be one the tokenizer can encode and at most :data:`MAX_ROW_BYTES` characters.
    """
    value = obj.get(name)
    if value is None:
        if required:
            reason = "missing_field" if name not in obj else "null_field"
            _reject(bad, loc, reason, f"field {name!r} is {'missing' if name not in obj else 'null'}")
        return None
    if not isinstance(value, kind):
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        _reject(bad, loc, "wrong_type", f"field {name!r} must be a {kinds}, got {type(value).__name__}")
    if isinstance(value, str):
        if len(value) > MAX_ROW_BYTES:  # rows from datasets tables reach here unmeasured
            _reject(
                bad,
                loc,
                "row_too_large",
                f"field {name!r} holds {len(value):,} characters, over {MAX_ROW_BYTES:,}",
            )
        problem = unencodable(value)
        if problem:
            _reject(
                bad,
                loc,
                "unencodable_text",
                f"field {name!r} holds text the tokenizer cannot encode: {problem}",
            )
    empty = not value.strip() if isinstance(value, str) else not value
    if required and empty:
        _reject(bad, loc, "empty_field", f"field {name!r} is empty")
    return value


def _reject(bad: BadRows, loc: str, reason: str, detail: str) -> None:
    bad.add(loc, reason, detail)  # raises under on_bad_row=fail
    raise _Skip


def _turns(
    turns: list, loc: str, fields: dict[str, str], sharegpt: bool, bad: BadRows
) -> list[dict[str, str]]:
    """Validated ``{"role", "content"}`` messages of a list of turns (roles mapped for ShareGPT)."""
    role_key, content_key = (
        (fields["speaker"], fields["value"]) if sharegpt else (fields["role"], fields["content"])
    )
    messages = []
    for i, turn in enumerate(turns, start=1):
        where = f"{loc} (turn {i})"
        if not isinstance(turn, dict):
            _reject(bad, where, "wrong_type", f"a turn must be an object, got {type(turn).__name__}")
        role = _field(turn, role_key, where, bad)
        content = _field(turn, content_key, where, bad)
        mapped = SHAREGPT_ROLES.get(role.lower()) if sharegpt else (role if role in CHAT_ROLES else None)
        if mapped is None:
            allowed = ", ".join(SHAREGPT_ROLES if sharegpt else CHAT_ROLES)
            _reject(bad, where, "bad_role", f"role {show(role)} is not one of {allowed}")
        messages.append({"role": mapped, "content": content})
    return messages


def _conversation(obj: dict, loc: str, fields: dict[str, str], sharegpt: bool, bad: BadRows) -> list:
    key = fields["conversations"] if sharegpt else fields["messages"]
    messages = _turns(_field(obj, key, loc, bad, kind=list), loc, fields, sharegpt, bad)
    if messages[-1]["role"] != "assistant":
        _reject(bad, loc, "bad_conversation", "a conversation must end with an assistant turn")
    if messages[0]["role"] == "assistant":
        # Rendering locates an answer by rendering the turns before it: an opening answer has none.
        _reject(bad, loc, "bad_conversation", "a conversation must not open with an assistant turn")
    return messages


def _side(obj: dict, name: str, loc: str, fields: dict[str, str], bad: BadRows) -> list[dict[str, str]]:
    """The messages of a preference field: a string is one assistant (or, for the prompt, user) turn."""
    value = _field(obj, name, loc, bad, kind=(str, list))
    if isinstance(value, str):
        return [{"role": "user" if name == fields["prompt"] else "assistant", "content": value}]
    return _turns(value, f"{loc} ({name})", fields, False, bad)


def _pair(obj: dict, loc: str, fields: dict[str, str], bad: BadRows) -> Row:
    """A preference row: ``messages`` = prompt + chosen answer, ``rejected`` = prompt + rejected answer.

    Explicit prompt: ``prompt`` (a string or messages) with ``chosen`` / ``rejected`` (a string or
    assistant messages). Implicit prompt (no ``prompt`` field): ``chosen`` and ``rejected`` are whole
    conversations; the turns they share from the start are the prompt, and what follows in each must
    be assistant turns only.
    """
    chosen = _side(obj, fields["chosen"], loc, fields, bad)
    rejected = _side(obj, fields["rejected"], loc, fields, bad)
    if obj.get(fields["prompt"]) is not None:
        prompt = _side(obj, fields["prompt"], loc, fields, bad)
    else:
        strings = any(isinstance(obj[fields[k]], str) for k in ("chosen", "rejected"))
        if fields["prompt"] in obj or strings:  # null, or answers without a conversation to share
            _field(obj, fields["prompt"], loc, bad)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            _reject(
                bad,
                loc,
                "no_common_prompt",
                f"no {fields['prompt']!r} field, and {fields['chosen']!r} and {fields['rejected']!r} do not "
                "start with the same turns (an implicit prompt is their shared opening)",
            )
    for name, answer in ((fields["chosen"], chosen), (fields["rejected"], rejected)):
        if not answer or any(m["role"] != "assistant" for m in answer):
            _reject(
                bad,
                loc,
                "no_common_prompt" if fields["prompt"] not in obj else "bad_conversation",
                f"{name!r} must be the assistant's answer to the prompt (assistant turns only after it)",
            )
    if prompt[-1]["role"] == "assistant" or all(m["role"] == "system" for m in prompt):
        _reject(bad, loc, "bad_conversation", "the prompt must end with a user turn")
    if chosen == rejected:
        _reject(bad, loc, "identical_answers", "the chosen and the rejected answers are the same")
    return Row(loc, messages=[*prompt, *chosen], rejected=[*prompt, *rejected])


def to_row(obj: dict, loc: str, fmt: str, fields: dict[str, str], bad: BadRows) -> Row | None:
    """The :class:`Row` of a raw object in format ``fmt``, or None (counted in ``bad``) if it is invalid.

    Raises :class:`UserError` on an invalid row under ``on_bad_row=fail``. Never raises anything
    else: an unexpected failure on this row is the bad row ``unreadable_row``.
    """
    try:
        return _to_row(obj, loc, fmt, fields, bad)
    except _Skip:
        return None
    except UserError:
        raise
    except Exception as err:  # a validation gap must cost one row, not the run
        bad.add(loc, "unreadable_row", describe(err))
        return None


def _to_row(obj: dict, loc: str, fmt: str, fields: dict[str, str], bad: BadRows) -> Row:
    if fmt == "text":
        return Row(loc, text=_field(obj, fields["text"], loc, bad))
    if fmt == "preference":
        return _pair(obj, loc, fields, bad)
    if fmt in ("chat", "sharegpt"):
        sharegpt = fmt == "sharegpt" or (fields["messages"] not in obj and fields["conversations"] in obj)
        return Row(loc, messages=_conversation(obj, loc, fields, sharegpt, bad))
    if fmt == "alpaca":
        instruction = _field(obj, fields["instruction"], loc, bad)
        extra = _field(obj, fields["input"], loc, bad, required=False)
        answer = _field(obj, fields["output"], loc, bad)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    else:  # prompt_completion
        user = _field(obj, fields["prompt"], loc, bad)
        answer = _field(obj, fields["completion"], loc, bad)
    system = _field(obj, fields["system"], loc, bad, required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return Row(
        loc, messages=[*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    )
