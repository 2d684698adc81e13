"""Reading and validating rows: files, globs, ``save_to_disk`` folders and hub datasets -> :class:`Row`.

Where rows come from (``data.source``, ``data.val_source``, ``data.test_source``):

- a file or a glob of files: ``.jsonl``, ``.json`` (an array of objects, or JSON lines), ``.csv``, ``.parquet``;
  a list mixes several;
- a folder written by ``datasets.save_to_disk`` (a ``Dataset`` or a ``DatasetDict`` with train / validation / test);
- a folder holding ``train.*``, and optionally ``val.*`` (or ``validation.*``) and ``test.*`` files;
- ``hf:<dataset id>`` with ``data.hub_split`` and ``data.hub_subset`` (needs the hub; offline it fails at once).

CSV, Parquet, saved and hub datasets are read by the ``datasets`` library. JSON and JSON Lines are
parsed here, line by line, because that is the only way to name the ``file:line`` of a bad row and to
catch what a columnar reader hides (duplicate keys, a row whose field changes type).

Every row is checked against ``data.format`` and becomes a conversation (``Row.messages``) or a raw
text (``Row.text``). A bad row is reported through :class:`BadRows`: with ``on_bad_row=fail`` the first
one stops the run with its location and reason; with ``skip`` it is left out and counted by reason.
A UTF-8 byte-order mark and CRLF line ends are read transparently and noted, not counted as bad.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_lora.errors import UserError

FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion", "text")
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


@dataclass
class Row:
    """One validated row: ``loc`` is where it came from (``file:line`` or ``file:row N``)."""

    loc: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    def to_json(self) -> dict:
        return {"loc": self.loc, "messages": self.messages, "text": self.text}


@dataclass
class BadRows:
    """Bad-row policy and bookkeeping: ``fail`` raises on the first, ``skip`` counts by reason."""

    policy: str = "fail"
    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, loc: str, reason: str, detail: str) -> None:
        if self.policy == "fail":
            raise UserError(
                f"{loc}: {detail} [{reason}]; fix the row, or set data.on_bad_row=skip to train on the good rows"
            )
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{loc}: {detail}")

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
class _DuplicateKey(ValueError):
    pass


class _Skip(Exception):
    """Raised after a bad row is counted (``skip`` policy) to abandon that row."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _text_of(path: Path, bad: BadRows) -> bytes:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        bad.note(f"{path}: UTF-8 byte-order mark ignored")
        data = data[3:]
    if b"\r\n" in data:
        bad.note(f"{path}: CRLF line ends read as LF")
    return data


def _parse_object(text: str, loc: str, bad: BadRows) -> dict | None:
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        bad.add(loc, "duplicate_key", f"key {err} appears twice in the row")
        return None
    except json.JSONDecodeError as err:
        bad.add(loc, "invalid_json", f"not valid JSON ({err.msg}, column {err.colno})")
        return None
    if not isinstance(obj, dict):
        bad.add(loc, "not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")
        return None
    return obj


def read_jsonl(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """``(file:line, object)`` for every good line of a JSON Lines file; blank lines are skipped."""
    out = []
    for number, raw in enumerate(_text_of(path, bad).split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        loc = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.add(
                loc, "invalid_utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at column {err.start + 1}"
            )
            continue
        obj = _parse_object(text, loc, bad)
        if obj is not None:
            out.append((loc, obj))
    return out


def read_json(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """Rows of a ``.json`` file: an array of objects (located as ``file:item N``), or JSON Lines."""
    data = _text_of(path, bad)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8; a .json array cannot be read past it") from err
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return read_jsonl(path, bad)
    try:
        items = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise UserError(f"{path}: key {err} appears twice in one object") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); the array cannot be read") from err
    out = []
    for number, obj in enumerate(items, start=1):
        loc = f"{path}:item {number}"
        if not isinstance(obj, dict):
            bad.add(loc, "not_an_object", f"a row must be a JSON object, got {type(obj).__name__}")
            continue
        out.append((loc, obj))
    return out


# ------------------------------------------------------------------------------- datasets-read sources
def _dataset_rows(dataset, origin: str) -> list[tuple[str, dict]]:
    return [(f"{origin}:row {i}", row) for i, row in enumerate(dataset, start=1)]


def read_csv(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    """Rows of a CSV file with a header, every column read as text (``007`` stays ``007``).

    Lines are checked here (UTF-8, number of fields, with Python's csv parser, so a row is located
    by its ``file:line``); the checked records are then read by ``datasets``.
    """
    import tempfile

    import datasets

    lines, numbers = [], []
    for number, raw in enumerate(_text_of(path, bad).split(b"\n"), start=1):
        try:
            lines.append(raw.rstrip(b"\r").decode("utf-8"))
            numbers.append(number)
        except UnicodeDecodeError as err:
            bad.add(f"{path}:{number}", "invalid_utf8", f"invalid UTF-8 byte 0x{raw[err.start]:02x}")
    reader = csv.reader(io.StringIO("\n".join(lines)))
    try:
        header = next(reader, [])
        if not header:
            raise UserError(f"{path}: a CSV file needs a header row naming its columns")
        records, locs = [], []
        for record in reader:
            loc = f"{path}:{numbers[reader.line_num - 1]}"
            if not record:
                continue
            if len(record) != len(header):
                bad.add(
                    loc,
                    "bad_csv_line",
                    f"expected {len(header)} fields ({','.join(header)}), got {len(record)}",
                )
                continue
            records.append(record)
            locs.append(loc)
    except csv.Error as err:
        raise UserError(
            f"{path}:{numbers[min(reader.line_num, len(numbers)) - 1]}: not valid CSV ({err})"
        ) from err
    clean = Path(tempfile.mkdtemp(prefix="lit_lora_csv_")) / path.name
    with clean.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *records])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        dataset = datasets.load_dataset(
            "csv", data_files=str(clean), split="train", features=features, keep_default_na=False
        )
    except Exception as err:  # pandas and arrow raise many types; the last line says what
        raise UserError(f"{path}: cannot be read as CSV: {str(err).strip().splitlines()[-1]}") from err
    return list(zip(locs, dataset, strict=True))


def read_parquet(path: Path) -> list[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:
        raise UserError(f"{path}: cannot be read as Parquet: {str(err).strip().splitlines()[-1]}") from err
    return _dataset_rows(dataset, str(path))


def read_file(path: Path, bad: BadRows) -> list[tuple[str, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, bad)
    if suffix == ".json":
        return read_json(path, bad)
    if suffix == ".csv":
        return read_csv(path, bad)
    return read_parquet(path)


def read_saved(folder: Path) -> dict[str, list[tuple[str, dict]]]:
    """Splits of a ``save_to_disk`` folder: a Dataset is all ``train``; a DatasetDict maps its splits."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise UserError(f"{folder}: cannot be read by datasets.load_from_disk: {err}") from err
    if isinstance(loaded, datasets.Dataset):
        return {"train": _dataset_rows(loaded, str(folder))}
    names = {"train": "train", "validation": "val", "val": "val", "test": "test"}
    out = {names[k]: _dataset_rows(v, f"{folder}/{k}") for k, v in loaded.items() if k in names}
    if "train" not in out:
        raise UserError(f"{folder}: the saved DatasetDict has no 'train' split (it has {', '.join(loaded)})")
    return out


def read_hub(spec: str, split: str, subset: str | None) -> list[tuple[str, dict]]:
    """Rows of a hub dataset; fails in seconds, with the way out, when the hub cannot be reached."""
    from lit_lora.model import hub_reachable

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
        raise UserError(f"data.source={spec}: {str(err).strip().splitlines()[0]}") from err
    return _dataset_rows(dataset, spec)


# --------------------------------------------------------------------------------------- validation
def _field(obj: dict, name: str, loc: str, bad: BadRows, required: bool = True, kind: type = str) -> Any:
    """The value of ``obj[name]`` if it has the right type (and is non-empty when required), else None."""
    value = obj.get(name)
    if value is None:
        if required:
            reason = "missing_field" if name not in obj else "null_field"
            _reject(bad, loc, reason, f"field {name!r} is {'missing' if name not in obj else 'null'}")
        return None
    if not isinstance(value, kind):
        _reject(
            bad, loc, "wrong_type", f"field {name!r} must be a {kind.__name__}, got {type(value).__name__}"
        )
    empty = not value.strip() if isinstance(value, str) else not value
    if required and empty:
        _reject(bad, loc, "empty_field", f"field {name!r} is empty")
    return value


def _reject(bad: BadRows, loc: str, reason: str, detail: str) -> None:
    bad.add(loc, reason, detail)  # raises under on_bad_row=fail
    raise _Skip


def _conversation(obj: dict, loc: str, fields: dict[str, str], sharegpt: bool, bad: BadRows) -> list:
    key, role_key, content_key = (
        (fields["conversations"], fields["speaker"], fields["value"])
        if sharegpt
        else (fields["messages"], fields["role"], fields["content"])
    )
    turns = _field(obj, key, loc, bad, kind=list)
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
            _reject(bad, where, "bad_role", f"role {role!r} is not one of {allowed}")
        messages.append({"role": mapped, "content": content})
    if messages[-1]["role"] != "assistant":
        _reject(bad, loc, "bad_conversation", "a conversation must end with an assistant turn")
    return messages


def to_row(obj: dict, loc: str, fmt: str, fields: dict[str, str], bad: BadRows) -> Row | None:
    """The :class:`Row` of a raw object in format ``fmt``, or None (counted in ``bad``) if it is invalid.

    Raises :class:`UserError` on an invalid row under ``on_bad_row=fail``.
    """
    try:
        return _to_row(obj, loc, fmt, fields, bad)
    except _Skip:
        return None


def _to_row(obj: dict, loc: str, fmt: str, fields: dict[str, str], bad: BadRows) -> Row:
    if fmt == "text":
        return Row(loc, text=_field(obj, fields["text"], loc, bad))
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
