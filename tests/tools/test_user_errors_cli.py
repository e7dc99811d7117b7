"""Every user error ends a tool with one line on stderr naming the culprit, no traceback, exit 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megadiff.errors import USER_ERROR_EXIT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def load_train_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(REPO, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def broken_hf_dir(tiny_run_dir, tmp_path, **config_changes):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_run_dir / "hf", hf)
    config = json.loads((hf / "config.json").read_text())
    config.update(config_changes)
    (hf / "config.json").write_text(json.dumps(config))
    return hf


@pytest.mark.parametrize("case", ["config", "layout", "data", "model_config", "tokenizer", "checkpoint", "max_seq_len"])
def test_train_reports_each_kind_of_user_error_in_one_line(case, tiny_run_dir, tmp_path, capsys):
    cfg = str(tiny_run_dir / "cfg.yaml")
    overrides, expected = {
        "config": (["parallel.etp=abc"], "parallel.etp must be an integer or null, got 'abc'"),
        "layout": (["parallel.tp=4"], "num_key_value_heads=2 is not divisible by parallel.tp=4"),
        "data": ([f"data.train_files={tmp_path / 'none.jsonl'}"], f"{tmp_path / 'none.jsonl'}: no such file"),
        "model_config": (
            [f"model.hf_dir={broken_hf_dir(tiny_run_dir, tmp_path, rope_theta='abc')}"],
            f"{tmp_path / 'hf' / 'config.json'}: rope_theta: must be a number",
        ),
        "tokenizer": ([f"model.tokenizer_dir={tmp_path}"], f"{tmp_path}: cannot load the tokenizer"),
        "checkpoint": ([f"model.hf_dir={tmp_path}"], f"{tmp_path / 'config.json'}: file not found"),
        "max_seq_len": (["data.max_seq_len=8192"], "data.max_seq_len=8192 is above max_position_embeddings=4096 of"),
    }[case]
    assert load_train_tool().main([cfg, *overrides]) == USER_ERROR_EXIT
    captured = capsys.readouterr()
    assert one_error_line(captured.err).startswith("error: ") and expected in captured.err
    assert not torch.distributed.is_initialized()


def test_train_user_error_exits_2_without_traceback_as_a_process(tiny_run_dir):
    proc = subprocess.run(
        [sys.executable, "tools/train.py", str(tiny_run_dir / "cfg.yaml"), "train.lr=.nan"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == USER_ERROR_EXIT
    assert one_error_line(proc.stderr) == "error: override 'train.lr=.nan': train.lr must be a finite number, got nan"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_on_cuda_without_cuda_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/generate.py", "--model", str(tmp_path), "--prompt", "hi", "--device", "cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == USER_ERROR_EXIT
    assert one_error_line(proc.stderr).startswith("error: --device cuda: CUDA is not available on this machine")


@pytest.mark.parametrize(
    "tool, args, expected",
    [
        (
            "convert_hf_to_mcore.py",
            ["--hf-dir", "{tmp}", "--output", "{tmp}/o", "--tp", "0"],
            "--tp must be a positive integer",
        ),
        (
            "moe_convertor.py",
            ["--input-path", "{tmp}/missing", "--output-path", "{tmp}/o", "--mode", "merge"],
            "{tmp}/missing",
        ),
        ("make_synthetic_data.py", ["--output", "{tmp}/d.jsonl", "--rows", "0"], "--rows must be >= 1"),
        (
            "compare_logits.py",
            ["--hf-dir", "{tmp}", "--input-ids", "{tmp}/ids.json"],
            "{tmp}/ids.json: cannot read input ids",
        ),
    ],
)
def test_other_tools_report_user_errors_in_one_line_with_exit_2(tool, args, expected, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, os.path.join("tools", tool), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr
    assert expected.format(tmp=tmp_path) in one_error_line(proc.stderr)
