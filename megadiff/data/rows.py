"""Read SFT chat rows from .jsonl / .parquet and validate every one before training starts.

A malformed row found hours into a run wastes the run; so all rows are read and checked up front, and
each problem is reported as `{file}:{line}: {reason}` (parquet: 1-based row number), which is what a
person needs to open the file and fix it. `skip_bad_rows=True` drops such rows instead and counts them.

Row format: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`; the last
message must be the assistant turn that is trained on. Other fields are ignored.
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


def validation_error(row) -> str | None:
    """Return why `row` (a decoded JSON value) is not a valid SFT row, or None when it is."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, expected a JSON object with a 'messages' field"
    if "messages" not in row:
        return "missing field 'messages'"
    messages = row["messages"]
    if not isinstance(messages, list):
        return f"field 'messages' is a {type(messages).__name__}, expected a list"
    if not messages:
        return "field 'messages' is empty"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is a {type(message).__name__}, expected an object with 'role' and 'content'"
        role = message.get("role")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}, expected one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"messages[{i}].content is {type(content).__name__}, expected str"
    if messages[-1]["role"] != "assistant":
        return (
            f"last message has role {messages[-1]['role']!r}; the last message must be the assistant turn to train on"
        )
    if not messages[-1]["content"].strip():
        # It would train on EOS alone: the model would learn to answer nothing.
        return "the assistant answer (last message) is empty; nothing to train on"
    return None


def _reason_kind(error: str) -> str:
    """Group reasons for counting: drop message indices and JSON decoder details."""
    for kind in ("invalid JSON", "invalid UTF-8"):
        if error.startswith(kind):
            return kind
    return re.sub(r"\[\d+\]", "[i]", error)


def jsonl_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line number, decoded row or None, decode error or None); blank lines are skipped.

    Lines are decoded one by one, so a line that is not UTF-8 is a bad row like any other (named,
    skippable) rather than an error for the whole file."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, None, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line)"
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"


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
        lambda row, where: {
            "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
            "source": where,
        },
        skip_bad_rows,
        kind="SFT",
        skip_hint="pass skip_bad_rows=True to skip such rows",
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
