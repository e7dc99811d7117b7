"""GSM8K: read question/answer rows, pull the final number out of a solution, turn rows into SFT chats.

GSM8K answers end in `#### <number>`. A model's output is scored by the number after its last `####`,
or, when it wrote none, its last number; numbers compare by value, so `1,234`, `$1234` and `1234.00`
all match a gold `1234`. An output with no number is wrong.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from megadiff.data.rows import DataError, jsonl_rows, list_data_files, parquet_rows

# A number: optional sign (not right after a word character, so "5-3" reads as 5 and 3), optional $,
# digits with proper thousands commas or plain digits, optional decimals; or a bare ".5".
NUMBER_RE = re.compile(r"(?:(?<![\w.])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-\u2212]?\.\d+")
FINAL_MARK = "####"


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-$3' -> '-3', '72.00' -> '72'; None when `text` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace("\u2212", "-").strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    normalized = format(value.normalize(), "f")
    return "0" if normalized in ("-0", "0") else normalized


def extract_answer(text: str) -> str | None:
    """The normalized number after the last `####` in `text`, else its last number, else None."""
    mark = text.rfind(FINAL_MARK)
    if mark >= 0:
        after = NUMBER_RE.search(text[mark + len(FINAL_MARK) :])
        if after:
            return normalize_number(after.group())
    numbers = NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gold_answer(answer: str) -> str:
    """The normalized number after the last `####` of a GSM8K reference answer (ValueError if none)."""
    mark = answer.rfind(FINAL_MARK)
    found = NUMBER_RE.search(answer[mark + len(FINAL_MARK) :]) if mark >= 0 else None
    if not found:
        raise ValueError(f"answer has no '{FINAL_MARK} <number>' ending: {answer[-80:]!r}")
    return normalize_number(found.group())


def answers_match(prediction: str | None, gold: str) -> bool:
    return prediction is not None and Decimal(prediction) == Decimal(gold)


def read_gsm8k_rows(source) -> list[dict]:
    """Rows with string `question` and `answer` from .jsonl/.parquet files; each gets `source`
    ('file:line'). A bad row raises DataError naming its file and line."""
    rows = []
    for path in list_data_files(source):
        reader = jsonl_rows if path.suffix == ".jsonl" else parquet_rows
        for line_no, row, error in reader(Path(path)):
            if error is None and not isinstance(row, dict):
                error = f"row is a {type(row).__name__}, expected an object with 'question' and 'answer'"
            for field in ("question", "answer"):
                if error is None and not isinstance(row.get(field), str):
                    error = f"field {field!r} is missing or not a string"
            if error is not None:
                raise DataError(f"{path}:{line_no}: {error}")
            rows.append({"question": row["question"], "answer": row["answer"], "source": f"{path}:{line_no}"})
    return rows


def sft_row(row: dict) -> dict:
    """A GSM8K row as an SFT chat row (the format megadiff.data.rows reads)."""
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]}


def split_rows(rows: list, test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test): a seeded shuffle, then round(len * test_fraction) rows go to test."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = round(len(rows) * test_fraction)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [rows[i] for i in train], [rows[i] for i in test]
