import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megadiff.data.rows import ACCEPTED_FORMATS, DataError, read_sft_rows

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"messages": [', "invalid JSON (Expecting value at column 15)"),
        ("[1, 2]", f"row is a list, expected a JSON object: {ACCEPTED_FORMATS}"),
        ({"conversation": []}, f"no SFT fields (the row has 'conversation'); accepted: {ACCEPTED_FORMATS}"),
        ({"messages": "hi"}, "field 'messages' is a str, expected a list"),
        ({"messages": []}, "field 'messages' is empty"),
        ({"messages": ["hi"]}, "messages[0] is a str, expected an object with 'role' and 'content'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]},
            "messages[1].role is 'tool', expected one of system, user, assistant",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role is None, expected one of system, user, assistant"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]},
            "messages[1].content is int, expected str",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
            "messages[1].content is NoneType, expected str",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "last message has role 'user'; the last message must be the assistant turn to train on",
        ),
    ],
)
def test_malformed_jsonl_row_raises_file_line_reason(tmp_path, bad_line, reason):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as err:
        read_sft_rows(path)
    assert str(err.value) == f"{path}:3: {reason} (set data.skip_bad_rows=true to skip such rows)"


def test_malformed_parquet_row_reports_one_based_row_number(tmp_path):
    bad = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    path = write_parquet(tmp_path / "train.parquet", [GOOD, bad])
    with pytest.raises(DataError, match=rf"^{path}:2: last message has role 'user'"):
        read_sft_rows(path)


def test_parquet_without_messages_column_reports_missing_field(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", [{"text": "hello"}])
    with pytest.raises(DataError, match=rf"^{path}:1: no SFT fields \(the row has 'text'\); accepted: "):
        read_sft_rows(path)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"^{path}: cannot read parquet file"):
        read_sft_rows(path)


def test_skip_bad_rows_skips_and_counts_by_reason(tmp_path):
    lines = [
        GOOD,
        "{oops",
        {"messages": []},
        GOOD,
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "robot", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "robot", "content": "x"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    rows, stats = read_sft_rows(path, skip_bad_rows=True)
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:4"]
    assert rows[0]["messages"] == GOOD["messages"]
    assert stats["rows_read"] == 6 and stats["rows_kept"] == 2 and stats["rows_skipped"] == 4
    assert stats["skip_reasons"] == {
        "invalid JSON": 1,
        "field 'messages' is empty": 1,
        "messages[i].role is 'robot', expected one of system, user, assistant": 2,
    }
    assert stats["errors"][0].startswith(f"{path}:2: invalid JSON")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": []}])
    with pytest.raises(
        DataError, match=rf"no valid SFT rows \(1 read\); first problem: {path}:1: field 'messages' is empty"
    ):
        read_sft_rows(path, skip_bad_rows=True)


def test_blank_lines_are_ignored_and_line_numbers_stay_true(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", "   ", {"messages": []}])
    with pytest.raises(DataError, match=rf"^{path}:4: field 'messages' is empty"):
        read_sft_rows(path)


def test_directory_reads_jsonl_and_parquet_sorted_by_name(tmp_path):
    def row(answer):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}

    write_jsonl(tmp_path / "b.jsonl", [row("b1"), row("b2")])
    write_parquet(tmp_path / "a.parquet", [row("a1")])
    write_jsonl(tmp_path / "c.jsonl", [row("c1")])
    (tmp_path / "notes.txt").write_text("ignored")
    rows, stats = read_sft_rows(tmp_path)
    assert [r["messages"][-1]["content"] for r in rows] == ["a1", "b1", "b2", "c1"]
    assert rows[0]["source"] == f"{tmp_path / 'a.parquet'}:1"
    assert stats["files"] == 3 and stats["rows_kept"] == 4 and stats["rows_skipped"] == 0


def test_list_of_paths_keeps_given_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "assistant", "content": "A"}]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "assistant", "content": "B"}]}])
    rows, _ = read_sft_rows([str(b), a])
    assert [r["messages"][0]["content"] for r in rows] == ["B", "A"]


def test_parquet_and_jsonl_give_the_same_rows(tmp_path):
    data = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        },
        GOOD,
    ]
    from_jsonl, _ = read_sft_rows(write_jsonl(tmp_path / "x.jsonl", data))
    from_parquet, _ = read_sft_rows(write_parquet(tmp_path / "x.parquet", data))
    assert [r["messages"] for r in from_jsonl] == [r["messages"] for r in from_parquet] == [d["messages"] for d in data]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: d / "missing.jsonl", "no such file or directory"),
        (
            lambda d: (d / "x.csv").write_text("a") and d / "x.csv",
            "unsupported file type '.csv'; expected .jsonl or .parquet",
        ),
        (lambda d: (d / "empty").mkdir() or d / "empty", "directory has no .jsonl or .parquet files"),
    ],
)
def test_bad_source_paths_are_named_in_the_error(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        read_sft_rows(path)
    assert str(err.value) == f"{path}: {reason}"
