"""GSM8K answer extraction, gold parsing and the SFT/test split."""

import json

import pytest

from megadiff.data.rows import DataError
from megadiff.inference.gsm8k import (
    answers_match,
    extract_answer,
    gold_answer,
    read_gsm8k_rows,
    sft_row,
    split_rows,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 1000 + 234 = 1,234 dollars.\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("The change is -12 degrees", "-12"),
        ("#### 3.50", "3.5"),
        ("It costs $2.25 each", "2.25"),
        ("#### $1,000,000", "1000000"),
        ("first 3, then 4 #### 7 and later 9", "7"),  # the last #### wins over later numbers
        ("#### 2 then #### 5", "5"),
        ("5-3=2", "2"),  # a minus between numbers is not a sign
        ("The answer is 72.", "72"),
        ("#### 72.00", "72"),
        ("#### no number, but 41 earlier", "41"),
        ("no number at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_missing_answer_counts_wrong_and_numbers_compare_by_value():
    assert not answers_match(None, "3")
    assert answers_match(extract_answer("#### 1,234.0"), gold_answer("x\n#### 1234"))
    assert not answers_match("-5", "5")


def test_gold_answer_reads_the_final_mark_and_refuses_rows_without_it():
    assert gold_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    with pytest.raises(ValueError, match="no '####"):
        gold_answer("the answer is 72")


def test_read_gsm8k_rows_names_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'answer'"):
        read_gsm8k_rows(str(path))


def test_read_gsm8k_rows_reads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": ["#### 1", "#### 2"]}), path)
    rows = read_gsm8k_rows(str(path))
    assert [(r["question"], r["answer"]) for r in rows] == [("a?", "#### 1"), ("b?", "#### 2")]
    assert rows[1]["source"].endswith("rows.parquet:2")


def test_split_rows_is_seeded_disjoint_and_sized_by_fraction():
    rows = list(range(20))
    train, test = split_rows(rows, 0.25, seed=0)
    assert len(test) == 5 and sorted(train + test) == rows
    assert split_rows(rows, 0.25, seed=0) == (train, test)
    assert split_rows(rows, 0.25, seed=1)[1] != test
    with pytest.raises(ValueError, match="test_fraction"):
        split_rows(rows, 1.5, seed=0)


def test_sft_row_is_a_user_question_and_assistant_answer():
    assert sft_row({"question": "q?", "answer": "a\n#### 1"}) == {
        "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a\n#### 1"}]
    }
