"""tools/build_gsm8k_dataset.py: GSM8K rows -> SFT chat rows, split into train/test."""

import importlib.util
import json
import os

from megadiff.data.rows import read_sft_rows
from megadiff.inference.gsm8k import read_gsm8k_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool():
    path = os.path.join(REPO, "tools", "build_gsm8k_dataset.py")
    spec = importlib.util.spec_from_file_location("build_gsm8k_dataset_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_rows(path, n, start=0):
    path.write_text(
        "".join(json.dumps({"question": f"q{i}?", "answer": f"step\n#### {i}"}) + "\n" for i in range(start, start + n))
    )


def test_build_gsm8k_dataset_splits_rows_into_train_and_test_chats(tmp_path, capsys):
    write_rows(tmp_path / "a.jsonl", 12)
    write_rows(tmp_path / "b.jsonl", 8, start=12)
    out = tmp_path / "out"
    args = [
        "--input",
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
        "--output-dir",
        str(out),
        "--test-fraction",
        "0.25",
        "--seed",
        "3",
    ]
    assert load_tool().main(args) == 0
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (15, 5)
    questions = [r["messages"][0]["content"] for r in train + test]
    assert sorted(questions) == sorted(f"q{i}?" for i in range(20))
    for row in train + test:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == f"step\n#### {user['content'][1:-1]}"
    assert all(set(r) == {"messages"} for r in train)
    assert all(
        r["question"] == r["messages"][0]["content"] and r["answer"] == r["messages"][1]["content"] for r in test
    )
    # the trainer's reader accepts train.jsonl; eval_gsm8k's reader accepts test.jsonl
    assert read_sft_rows(str(out / "train.jsonl"))[1]["rows_kept"] == 15
    assert len(read_gsm8k_rows(str(out / "test.jsonl"))) == 5
    # same seed, same split
    first_test = (out / "test.jsonl").read_text()
    assert load_tool().main(args) == 0 and (out / "test.jsonl").read_text() == first_test
    assert str(out / "test.jsonl") in capsys.readouterr().out.strip().splitlines()[-1]


def test_build_gsm8k_dataset_names_the_bad_row(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    assert load_tool().main(["--input", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: field 'answer' is missing" in capsys.readouterr().err
