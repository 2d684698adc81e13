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

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lit_lora.errors import UserError

FORMATS = ("alpaca", "chat", "sharegpt", "prompt_completion", "text", "preference", "prompt")
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
    answer, ``rejected`` with the rejected one. A prompt row (``data.format=prompt``, GRPO) holds the
    prompt's turns in ``messages`` (ending with a user turn), the prompt as the row gave it in ``prompt``
    (a string or a list of messages: what the reward functions see) and every other column of the row in
    ``columns`` (what the reward functions read: an answer, a schema, test cases...)."""

    loc: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    rejected: list[dict[str, str]] | None = None
    prompt: Any = None
    columns: dict[str, Any] | None = None

    @property
    def prompt_turns(self) -> list[dict[str, str]]:
        """The turns a model answers: a prompt row's whole ``messages``, otherwise every turn before the
        last (the reference answer)."""
        return list(self.messages) if self.columns is not None else self.messages[:-1]

    @property
    def reference(self) -> str | None:
        """The reference answer: the last turn's text, or a prompt row's ``answer`` column when it is a
        string (the RL demo's), else None (a prompt row is scored by rewards, not against a reference)."""
        if self.columns is not None:
            answer = self.columns.get("answer")
            return answer if isinstance(answer, str) else None
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        out = {"loc": self.loc, "messages": self.messages, "text": self.text, "rejected": self.rejected}
        if self.columns is not None:
            out.update(prompt=self.prompt, columns=self.columns)
        return out


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


# --------------------------------------------------------------------------------------- validation
class _Skip(Exception):
    """Raised after a bad row is counted (``skip`` policy) to abandon that row."""


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


def _prompt_row(obj: dict, loc: str, fields: dict[str, str], bad: BadRows) -> Row:
    """A prompt row: ``prompt`` is a string (one user turn, after the optional ``system`` field's turn) or
    a list of messages ending with a user turn; every other column rides along for the rewards."""
    value = _field(obj, fields["prompt"], loc, bad, kind=(str, list))
    if isinstance(value, str):
        system = _field(obj, fields["system"], loc, bad, required=False)
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages.append({"role": "user", "content": value})
    else:
        messages = _turns(value, f"{loc} ({fields['prompt']})", fields, False, bad)
        if messages[-1]["role"] != "user":
            _reject(
                bad, loc, "bad_conversation", "the prompt must end with a user turn (the model answers it)"
            )
    columns = {key: v for key, v in obj.items() if key != fields["prompt"]}
    return Row(loc, messages=messages, prompt=value, columns=columns)


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
    if fmt == "prompt":
        return _prompt_row(obj, loc, fields, bad)
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
