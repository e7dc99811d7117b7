"""No tool writes over or into its own inputs (megadiff.files.outputs), and generate / eval find
a bad output path, token id or prompt length before the weights load (a failing loader stands in
for them: a test that reaches it fails)."""

import importlib
import json
import os
import shutil

import pytest

from megadiff.hf.tiny import write_tiny_model_dir

DECODING = ["--gen-length", "8", "--block-length", "8", "--steps", "2", "--device", "cpu"]


def load_tool(name):
    """The code of tools/NAME.py (a thin script over megadiff.cli.NAME), where the tests patch the loader."""
    return importlib.import_module(f"megadiff.cli.{name}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llada2") / "model"), seed=0)


@pytest.fixture
def tool_without_weights(monkeypatch):
    """(tool module): its model loader fails the test if reached."""

    def load(name):
        tool = load_tool(name)

        def no_weights(args):
            raise AssertionError("the weights were loaded before the inputs were checked")

        monkeypatch.setattr(tool, "load_decoding_model", no_weights)
        return tool

    return load


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_generate_refuses_an_output_that_is_one_of_its_inputs(model_dir, tmp_path, tool_without_weights, capsys):
    generate = tool_without_weights("generate")
    config = os.path.join(model_dir, "config.json")
    before = open(config).read()
    ids = tmp_path / "ids.json"
    ids.write_text("[[1, 2, 3]]")
    cases = {  # --output, extra args, what the message names
        config: (["--prompt", "hi"], f"--output {config} is inside the input --model {model_dir}"),
        str(ids): (["--input-ids", str(ids)], f"--output {ids} is the input --input-ids {ids}"),
        os.path.join(model_dir, "..", "model", "new.jsonl"): (["--prompt", "hi"], "is inside the input --model"),
    }
    for output, (extra, message) in cases.items():
        assert generate.main(["--model", model_dir, *extra, "--output", output, *DECODING]) == 2
        assert message in error_line(capsys)
    assert open(config).read() == before and ids.read_text() == "[[1, 2, 3]]"


def test_generate_refuses_an_output_link_or_directory_before_loading(model_dir, tmp_path, tool_without_weights, capsys):
    generate = tool_without_weights("generate")
    (tmp_path / "victim").write_text("precious")
    os.symlink(tmp_path / "victim", tmp_path / "out.jsonl")
    args = ["--model", model_dir, "--prompt", "hi", *DECODING]
    assert generate.main([*args, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "out.jsonl is a symbolic link" in error_line(capsys)
    assert generate.main([*args, "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a directory; name a file" in error_line(capsys)
    assert generate.main([*args, "--output", str(tmp_path / "missing" / "o.jsonl")]) == 2
    assert "does not exist; create it first" in error_line(capsys)
    assert (tmp_path / "victim").read_text() == "precious"


def test_generate_checks_token_ids_and_prompt_length_before_loading(model_dir, tmp_path, tool_without_weights, capsys):
    generate = tool_without_weights("generate")
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[1, 2, vocab + 5]]))
    assert generate.main(["--model", model_dir, "--input-ids", str(ids), *DECODING]) == 2
    assert f"{ids}: prompts[0][2]={vocab + 5} is outside the model vocabulary [0, {vocab})" in error_line(capsys)
    limit = json.load(open(os.path.join(model_dir, "config.json")))["max_position_embeddings"]
    ids.write_text(json.dumps([[1] * limit]))
    assert generate.main(["--model", model_dir, "--input-ids", str(ids), *DECODING]) == 2
    assert f"beyond the model's max_position_embeddings={limit}" in error_line(capsys)


def test_eval_refuses_a_file_or_an_input_as_its_output_dir_before_loading(
    model_dir, tmp_path, tool_without_weights, capsys
):
    evaluate = tool_without_weights("eval_gsm8k")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text(json.dumps({"question": "1 + 2?", "answer": "#### 3"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    cases = {
        str(tmp_path / "a_file"): f"--output-dir {tmp_path / 'a_file'} is a file; name a directory",
        model_dir: f"--output-dir {model_dir} is the input --model {model_dir}",
        str(data / "eval"): f"--output-dir {data / 'eval'} is inside the input --data {data}",
        str(data): f"--output-dir {data} is the input --data {data}",
    }
    for output_dir, message in cases.items():
        rc = evaluate.main(["--model", model_dir, "--data", str(data), "--output-dir", output_dir, *DECODING])
        assert rc == 2 and message in error_line(capsys)
    assert sorted(os.listdir(data)) == ["test.jsonl"] and not os.path.exists(os.path.join(model_dir, "samples.jsonl"))
    # the data file itself named samples.jsonl in the output dir: the output dir may hold inputs, not replace them
    shutil.move(data / "test.jsonl", tmp_path / "samples.jsonl")
    rc = evaluate.main(["--model", model_dir, "--data", str(tmp_path / "samples.jsonl"), "--output-dir", str(tmp_path)])
    assert rc == 2 and f"--output-dir {tmp_path / 'samples.jsonl'} is the input --data" in error_line(capsys)


def test_build_gsm8k_dataset_never_writes_over_the_rows_it_reads(tmp_path, capsys):
    rows = tmp_path / "train.jsonl"  # named like the tool's own output, in the output dir
    rows.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(10)))
    before = rows.read_text()
    assert load_tool("build_gsm8k_dataset").main(["--input", str(rows), "--output-dir", str(tmp_path)]) == 2
    assert f"--output-dir {rows} is the input --input {rows}" in error_line(capsys)
    assert rows.read_text() == before and sorted(os.listdir(tmp_path)) == ["train.jsonl"]
