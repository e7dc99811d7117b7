"""The LLaDA2.1 decoding flags (--editing-threshold, --max-post-steps, --num-to-transfer) and the same
fields in a model dir's generation_config.json."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, encode_prompt, generate, load_model, load_tokenizer
from megadiff.inference.cli import add_decoding_arguments, decoding_options
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def options_for(model_dir, *flags):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    add_decoding_arguments(parser)
    return decoding_options(parser.parse_args(["--model", str(model_dir), *flags]))


def write_generation_config(directory, **fields):
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, **fields}, f)


def test_editing_is_off_by_default_and_the_flags_set_it(tmp_path):
    assert options_for(tmp_path).editing_threshold is None
    options = options_for(tmp_path, "--editing-threshold", "0.7", "--max-post-steps", "3", "--num-to-transfer", "2")
    assert (options.editing_threshold, options.max_post_steps, options.num_to_transfer) == (0.7, 3, 2)


def test_generation_config_turns_editing_on_and_the_command_line_overrides_it(tmp_path):
    write_generation_config(tmp_path, editing_threshold=0.9, max_post_steps=5)
    options = options_for(tmp_path)
    assert (options.editing_threshold, options.max_post_steps, options.num_to_transfer) == (0.9, 5, 1)
    assert options_for(tmp_path, "--editing-threshold", "off").editing_threshold is None
    assert options_for(tmp_path, "--max-post-steps", "0").max_post_steps == 0


def test_a_bad_generation_config_field_names_the_file(tmp_path):
    write_generation_config(tmp_path, editing_threshold=2.0)
    with pytest.raises(ValueError, match=r"generation_config\.json: editing_threshold must be in \[0, 1\]"):
        options_for(tmp_path)


def test_generate_cli_decodes_with_editing_and_reports_edits(tmp_path):
    model_dir = write_tiny_model_dir(str(tmp_path / "tiny"), seed=0)
    out = tmp_path / "gen.jsonl"
    flags = ["--gen-length", "16", "--block-length", "8", "--editing-threshold", "0.0", "--max-post-steps", "2"]
    proc = subprocess.run(
        [sys.executable, "tools/generate.py", "--model", model_dir, "--prompt", "Hi", "--output", str(out), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    options = DecodingOptions(gen_length=16, block_length=8, editing_threshold=0.0, max_post_steps=2)
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    expected = generate(model, [encode_prompt("Hi", tokenizer)], options, mask_id, tokenizer.eos_token_id)
    assert json.loads(out.read_text())["generated_ids"] == expected.tokens[0]
    assert f"edits: {expected.num_edits}," in proc.stdout and expected.num_edits > 0
    # the tiny model's records show no edit training: the flag decodes as asked, with a warning
    assert "warning: --editing-threshold 0.0 on a model not trained for token editing" in proc.stderr
