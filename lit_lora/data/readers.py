"""Hardened reading of one source into raw records ``(location, object)``: JSON, JSON Lines and CSV
parsed here row by row (so that a bad row is named by ``file:line`` and contained, see
:mod:`lit_lora.data.rows`), Parquet, saved and hub datasets through the ``datasets`` library in
batches, a failing batch read again row by row."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from lit_lora.data.rows import (
    DATASET_BATCH,
    HUB_PREFIX,
    MAX_JSON_DEPTH,
    MAX_NUMBER_CHARS,
    MAX_ROW_BYTES,
    BadRows,
    describe,
    one_line,
    show,
)
from lit_lora.errors import UserError


# ---------------------------------------------------------------------------------------- JSON family
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
    from lit_lora.network import hub_reachable

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
