"""tools/generate.py end to end on a tiny random model dir."""

import importlib
import json
import os
import shlex
import subprocess
import sys

import pytest

from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, encode_chat, encode_prompt, generate, load_model, load_tokenizer
from megadiff.inference.cli import command_line
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = worker_env()  # one thread, CPU only, as tests/conftest.py pins in-process
TOOL = os.path.join("tools", "generate.py")
DECODING = ["--gen-length", "16", "--block-length", "8", "--steps", "4", "--device", "cpu"]


def load_tool():
    return importlib.import_module("megadiff.cli.generate")  # the code of tools/generate.py (a thin script)


def run_tool(args, stdin=None):
    return subprocess.run(
        [sys.executable, TOOL, *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120, env=ENV
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llada2")), seed=0)


def test_generate_cli_writes_the_library_generations_to_output(model_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    proc = run_tool(
        [
            "--model",
            model_dir,
            "--prompt",
            "What is 2 + 2?",
            "--prompt",
            "Hello there",
            "--batch-size",
            "2",
            "--output",
            str(out),
            *DECODING,
        ]
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = [encode_prompt(p, tokenizer) for p in ("What is 2 + 2?", "Hello there")]
    expected = generate(
        model,
        prompts,
        DecodingOptions(gen_length=16, block_length=8, steps=4),
        tokenizer.convert_tokens_to_ids("<|mask|>"),
        tokenizer.eos_token_id,
    )
    assert [r["prompt_ids"] for r in rows] == prompts
    assert [r["generated_ids"] for r in rows] == expected.tokens
    assert rows[0]["text"] == tokenizer.decode(expected.tokens[0], skip_special_tokens=True)
    assert "tokens per forward pass" in proc.stdout and "tokens/s" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"generations written to {out}"


def test_generate_cli_chat_keeps_the_conversation_across_turns(model_dir, tmp_path):
    out = tmp_path / "chat.jsonl"
    proc = run_tool(
        ["--model", model_dir, "--chat", "--output", str(out), *DECODING],
        stdin="Hello\nWhat is 3 + 4?\n/exit\nnever read\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    turns = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["user"] for t in turns] == ["Hello", "What is 3 + 4?"]
    tokenizer = load_tokenizer(model_dir)
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": turns[0]["text"]},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    assert turns[1]["prompt_ids"] == encode_chat(history, tokenizer)


def test_generate_cli_reads_input_ids_and_raw_prompts(model_dir, tmp_path, capsys):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([[5, 6, 7], [8, 9]]))
    out = tmp_path / "ids.jsonl"
    assert load_tool().main(["--model", model_dir, "--input-ids", str(ids_file), "--output", str(out), *DECODING]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in rows] == [[5, 6, 7], [8, 9]] and all(r["generated_ids"] for r in rows)
    assert (
        load_tool().main(["--model", model_dir, "--prompt", "2 + 2 =", "--raw", "--output", str(out), *DECODING]) == 0
    )
    tokenizer = load_tokenizer(model_dir)
    assert json.loads(out.read_text())["prompt_ids"] == tokenizer.encode("2 + 2 =", add_special_tokens=False)


def test_generate_cli_missing_model_dir_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert load_tool().main(["--model", str(missing), "--prompt", "hi"]) == 2
    assert f"{missing}: model directory not found" in capsys.readouterr().err


def test_generate_cli_bad_decoding_flag_is_named(model_dir, capsys):
    assert load_tool().main(["--model", model_dir, "--prompt", "hi", "--block-length", "0"]) == 2
    assert "block_length must be a positive integer" in capsys.readouterr().err


def test_generate_cli_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool().main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in (
        "--model",
        "--prompt",
        "--input-ids",
        "--chat",
        "--raw",
        "--gen-length",
        "--block-length",
        "--steps",
        "--threshold",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--batch-size",
        "--mask-id",
        "--eos-id",
        "--output",
    ):
        assert flag in help_text


def test_printed_command_line_parses_back_to_the_same_arguments():
    parser = load_tool().build_parser()
    args = parser.parse_args(["--model", "m dir", "--prompt", "a b", "--prompt", "c", "--raw", "--top-k", "5"])
    printed = command_line("tools/generate.py", parser, args)
    assert vars(parser.parse_args(shlex.split(printed)[1:])) == vars(args)
    eval_tool = importlib.import_module("megadiff.cli.eval_gsm8k")
    parser = eval_tool.build_parser()
    args = parser.parse_args(["--model", "m", "--data", "a.jsonl", "b.jsonl", "--output-dir", "o", "--limit", "3"])
    assert vars(parser.parse_args(shlex.split(command_line("x", parser, args))[1:])) == vars(args)
