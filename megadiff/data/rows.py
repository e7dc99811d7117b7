"""Read SFT chat rows from .jsonl / .parquet and validate every one before training starts.

A malformed row found hours into a run wastes the run; so all rows are read and checked up front, and
each problem is reported as `{file}:{line}: {reason}` (parquet: 1-based row number), which is what a
person needs to open the file and fix it. `skip_bad_rows=True` drops such rows instead and counts them.

Row formats (other fields are ignored; every format becomes `messages`):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, the last message being
  the assistant turn that is trained on;
- TRL's prompt/completion: `{"prompt": [messages], "completion": [assistant message(s)]}` (several
  assistant messages are joined with a newline into one answer), or the same two fields as plain
  strings (the prompt becomes one user turn, as megadiff's DPO rows do);
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}` ("user" and
  "assistant" are accepted for "from" too), the last turn being gpt's.

JSON lines are parsed strictly: a key given twice in one object (json keeps the last one silently),
nesting too deep for the parser, or a lone UTF-16 surrogate (`"\ud800"`, not text a tokenizer can
encode) is a bad row named by file and line like any other.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from megadiff.errors import UserError

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".parquet")
MAX_REPORTED_ERRORS = 20
SKIP_HINT = "set data.skip_bad_rows=true to skip such rows"


class DataError(UserError):
    """A data file or row is unusable; the message starts with `{file}:{line}:`."""


def list_data_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """Return the data files named by `source`: one file, a list of files, or a directory (sorted).

    A directory contributes its `*.jsonl` and `*.parquet` files (not recursive), sorted by name so the
    sample order, and hence every global sample index, is the same on every machine.
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise DataError("no data files given")
    files: list[Path] = []
    for item in sources:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory has no {' or '.join(SUFFIXES)} files")
            files.extend(found)
        elif not path.exists():
            raise DataError(f"{path}: no such file or directory")
        elif path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected {' or '.join(SUFFIXES)}")
        else:
            files.append(path)
    return files


ACCEPTED_FORMATS = (
    '{"messages": [{"role", "content"}, ...]}, TRL\'s {"prompt", "completion"} (message lists or strings) '
    'or ShareGPT\'s {"conversations": [{"from", "value"}, ...]}'
)
SHAREGPT_ROLES = {"system": "system", "human": "human", "user": "user", "gpt": "gpt", "assistant": "assistant"}
_FROM_SHAREGPT = {"human": "user", "gpt": "assistant"}


def _one_of(choices) -> str:
    return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)


def messages_problem(value, field: str, roles=ROLES, expected: str = "a list") -> str | None:
    """Why `value` is not a non-empty list of {"role", "content": str} messages whose roles are in
    `roles`, or None (shared by every chat-shaped field: SFT messages, TRL prompts, DPO pairs)."""
    if not isinstance(value, list):
        return f"field '{field}' is a {type(value).__name__}, expected {expected}"
    if not value:
        return f"field '{field}' is empty"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{field}[{i}] is a {type(message).__name__}, expected an object with 'role' and 'content'"
        role = message.get("role")
        if role not in roles:
            return f"{field}[{i}].role is {role!r}, expected {_one_of(roles)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{field}[{i}].content is {type(content).__name__}, expected str"
    return None


def _sharegpt_messages(turns) -> tuple[list[dict] | None, str | None]:
    if not isinstance(turns, list) or not turns:
        return None, messages_problem(turns, "conversations")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None, f"conversations[{i}] is a {type(turn).__name__}, expected an object with 'from' and 'value'"
        if turn.get("from") not in SHAREGPT_ROLES:
            return None, f"conversations[{i}].from is {turn.get('from')!r}, expected {_one_of(tuple(SHAREGPT_ROLES))}"
        if not isinstance(turn.get("value"), str):
            return None, f"conversations[{i}].value is {type(turn.get('value')).__name__}, expected str"
        messages.append({"role": _FROM_SHAREGPT.get(turn["from"], turn["from"]), "content": turn["value"]})
    return messages, None


def _prompt_completion_messages(prompt, completion) -> tuple[list[dict] | None, str | None]:
    if isinstance(prompt, str) != isinstance(completion, str):
        return None, "'prompt' and 'completion' mix a string and a message list; use one form for both"
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], None
    problem = messages_problem(prompt, "prompt") or messages_problem(completion, "completion", ("assistant",))
    if problem:
        return None, problem
    if prompt[-1]["role"] == "assistant":
        return None, "the last message of 'prompt' is the assistant's; the prompt must end with a user (or system) turn"
    answer = "\n".join(m["content"] for m in completion)
    return [*prompt, {"role": "assistant", "content": answer}], None


def sft_messages(row) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a valid SFT row in any accepted format (module docstring), else (None, why)."""
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, expected a JSON object: {ACCEPTED_FORMATS}"
    present = [f for f in ("messages", "conversations", "prompt") if row.get(f) is not None]  # parquet: None = absent
    if len(present) > 1:
        return None, f"the row has both {present[0]!r} and {present[1]!r}; keep one format ({ACCEPTED_FORMATS})"
    if not present:
        if all(row.get(f) is not None for f in ("chosen", "rejected")):
            return None, "this is a preference (DPO) row ('chosen'/'rejected'); set train.objective=dpo to train on it"
        keys = ", ".join(map(repr, list(row)[:8])) or "no fields"
        return None, f"no SFT fields (the row has {keys}); accepted: {ACCEPTED_FORMATS}"
    if present == ["prompt"]:
        if row.get("completion") is None:
            if all(row.get(f) is not None for f in ("chosen", "rejected")):
                return (
                    None,
                    "this is a preference (DPO) row ('chosen'/'rejected'); set train.objective=dpo to train on it",
                )
            return None, "field 'prompt' without 'completion' (TRL's prompt/completion format needs both)"
        messages, problem = _prompt_completion_messages(row["prompt"], row["completion"])
    elif present == ["conversations"]:
        messages, problem = _sharegpt_messages(row["conversations"])
    else:
        messages, problem = row["messages"], messages_problem(row["messages"], "messages")
    if problem:
        return None, problem
    if messages[-1]["role"] != "assistant":
        return None, (
            f"last message has role {messages[-1]['role']!r}; the last message must be the assistant turn to train on"
        )
    if not messages[-1]["content"].strip():
        # It would train on EOS alone: the model would learn to answer nothing.
        return None, "the assistant answer (last message) is empty; nothing to train on"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


def validation_error(row) -> str | None:
    """Return why `row` (a decoded JSON value) is not a valid SFT row, or None when it is."""
    return sft_messages(row)[1]


def _reason_kind(error: str) -> str:
    """Group reasons for counting: drop message indices and JSON decoder details."""
    for kind in ("invalid JSON", "invalid UTF-8", "invalid text"):
        if error.startswith(kind):
            return kind
    return re.sub(r"\[\d+\]", "[i]", error)


class _DuplicateKey(Exception):
    pass


def _object_without_duplicates(pairs: list) -> dict:
    """json's object_pairs_hook: a dict, or _DuplicateKey when a key comes twice (json keeps the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def parse_json_line(line: str) -> tuple[object, str | None]:
    """(decoded value, None), or (None, why the line is not a usable JSON row): invalid JSON, a key
    given twice in one object, nesting beyond the parser's recursion limit, a lone surrogate."""
    try:
        value = json.loads(line, object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as e:
        return None, f"invalid JSON (key {e.args[0]!r} appears twice in one object; only one would be kept)"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply to parse)"
    if "\\u" in line:  # only a \u escape can spell a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            return None, f"invalid text (a lone UTF-16 surrogate {e.object[e.start]!r}: not a character)"
    return value, None


def jsonl_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line number, decoded row or None, decode error or None); blank lines are skipped.

    Lines are decoded one by one, so a line that is not UTF-8 (or not strict JSON: parse_json_line)
    is a bad row like any other (named, skippable) rather than an error for the whole file."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors write one)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line)"
                continue
            if not line.strip():
                continue
            yield line_no, *parse_json_line(line.rstrip("\r\n"))


def parquet_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (1-based row number, row dict, None) for each parquet row."""
    import pyarrow.parquet as pq  # optional (dev extra): only parquet inputs need it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: cannot read parquet file ({e})") from e
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield row_no, row, None


def read_sft_rows(source: str | Path | Iterable[str | Path], skip_bad_rows: bool = False) -> tuple[list[dict], dict]:
    """Read and validate every SFT row; return (rows, stats).

    rows: `[{"messages": [{"role", "content"}, ...], "source": "file:line"}, ...]` in file order; a
    row's index in this list is its global sample index (used for packing and noise seeds).
    stats: files, rows_read, rows_kept, rows_skipped, skip_reasons (reason -> count) and errors (the
    first MAX_REPORTED_ERRORS `file:line: reason` strings).
    Raises DataError on the first bad row unless skip_bad_rows, and when no valid row remains.
    """
    return read_valid_rows(
        source,
        validation_error,
        lambda row, where: {"messages": sft_messages(row)[0], "source": where},
        skip_bad_rows,
        kind="SFT",
        skip_hint=SKIP_HINT,
    )


def read_valid_rows(source, problem, make_row, skip_bad_rows: bool, kind: str, skip_hint: str):
    """The reading loop shared by every row format: each row of every jsonl/parquet file is checked
    by `problem(row)` (a reason or None) and kept as `make_row(row, "file:line")`; a bad row is an
    error (ending with `skip_hint`) unless skip_bad_rows, then counted. Returns (rows, stats) as
    read_sft_rows documents; raises DataError when no valid `kind` row remains."""
    files = list_data_files(source)
    rows: list[dict] = []
    reasons: Counter = Counter()
    errors: list[str] = []
    rows_read = 0
    for path in files:
        reader = jsonl_rows if path.suffix == ".jsonl" else parquet_rows
        for line_no, row, error in reader(path):
            rows_read += 1
            error = error or problem(row)
            if error is not None:
                message = f"{path}:{line_no}: {error}"
                if not skip_bad_rows:
                    raise DataError(f"{message} ({skip_hint})")
                reasons[_reason_kind(error)] += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(message)
                continue
            rows.append(make_row(row, f"{path}:{line_no}"))
    stats = {
        "files": len(files),
        "rows_read": rows_read,
        "rows_kept": len(rows),
        "rows_skipped": rows_read - len(rows),
        "skip_reasons": dict(reasons),
        "errors": errors,
    }
    if not rows:
        detail = f"; first problem: {errors[0]}" if errors else ""
        raise DataError(f"{', '.join(map(str, files))}: no valid {kind} rows ({rows_read} read){detail}")
    return rows, stats
