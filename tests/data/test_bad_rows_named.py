"""Invalid UTF-8 and empty answers are bad rows like any other: named by file and line, and skipped
(and counted) with skip_bad_rows."""

import json

import pytest

from megadiff.data.rows import DataError, read_sft_rows

GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


def test_invalid_utf8_names_file_and_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    bad = b'{"messages": [{"role": "assistant", "content": "caf\xe9"}]}'  # latin-1, not UTF-8
    path.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    offset = bad.index(b"\xe9")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid UTF-8 \(byte 0xe9 at byte offset {offset} of the line\)"):
        read_sft_rows(path)
    rows, stats = read_sft_rows(path, skip_bad_rows=True)
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:3"]
    assert stats["rows_skipped"] == 1 and stats["skip_reasons"] == {"invalid UTF-8": 1}


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_assistant_answer_is_refused_and_can_be_skipped(tmp_path, answer):
    path = tmp_path / "d.jsonl"
    empty = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]})
    path.write_text(GOOD + "\n" + empty + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: the assistant answer \(last message\) is empty"):
        read_sft_rows(path)
    rows, stats = read_sft_rows(path, skip_bad_rows=True)
    assert len(rows) == 1 and stats["rows_skipped"] == 1
    assert stats["errors"] == [f"{path}:2: the assistant answer (last message) is empty; nothing to train on"]
