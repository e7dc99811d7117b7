"""The training config is typed: every value is checked against its field's annotation (Optional and
Literal included) and range when it is set, and layout errors name the parallel.* key."""

import dataclasses
import os
import subprocess
import sys
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from megadiff.training.config import TrainingConfig, TrainingConfigError, describe_config, load_config

BASE = ["model.hf_dir=m", "data.train_files=d.jsonl"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mask_token_id=abc", "model.mask_token_id must be an integer or null, got 'abc'"),
        ("model.mask_token_id=1.5", "model.mask_token_id must be an integer or null, got 1.5"),
        ("model.mask_token_id=-1", "model.mask_token_id must be >= 0, got -1"),
        ("data.train_files=123", "data.train_files must be a string, a list of strings or null, got 123"),
        ("data.train_files=[a, 3]", r"data.train_files must be a string, a list of strings or null, got \['a', 3\]"),
        ("model.hf_dir=[x,y]", r"model.hf_dir must be a string or null, got \['x', 'y'\]"),
        ("parallel.etp=abc", "parallel.etp must be an integer or null, got 'abc'"),
        ("parallel.vpp=[1,2]", r"parallel.vpp must be an integer or null, got \[1, 2\]"),
        ("parallel.vpp=1", "parallel.vpp must be >= 2, got 1"),
        ("checkpoint.save_dir=3", "checkpoint.save_dir must be a string or null, got 3 .quote it"),
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),
        ("train.lr=-1e-5", "train.lr must be >= 0.0, got -1e-05"),
        ("train.warmup_steps=-5", "train.warmup_steps must be >= 0, got -5"),
        ("train.adam_beta2=1.0", "train.adam_beta2 must be >= 0.0 and < 1.0, got 1.0"),
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("logging.log_interval=0", "logging.log_interval must be >= 1, got 0"),
        ("data.skip_bad_rows=yes please", "data.skip_bad_rows must be true or false"),
        ("model.dtype=fp16", "model.dtype='fp16' is not one of auto, bf16, fp32"),
        ("train.min_lr=1", r"train.min_lr=1.0 is above train.lr=1e-05"),
    ],
)
def test_wrong_type_or_range_is_refused_naming_the_key(override, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, BASE + [override])


def test_good_values_of_optional_and_union_fields_load():
    cfg = load_config(
        None,
        BASE[:1]
        + [
            "data.train_files=[a.jsonl, b.jsonl]",
            "model.mask_token_id=7",
            "parallel.etp=null",
            "parallel.pp=2",
            "parallel.vpp=2",
            "checkpoint.save_dir='3'",
            "train.lr=3",
            "train.warmup_steps=5",
        ],
    )
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.model.mask_token_id == 7
    assert cfg.parallel.etp is None and cfg.parallel.vpp == 2 and cfg.checkpoint.save_dir == "3"
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float) and cfg.train.warmup_steps == 5


def test_yaml_values_are_typed_like_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hf_dir: m, mask_token_id: abc}\ndata: {train_files: d.jsonl}\n")
    with pytest.raises(TrainingConfigError, match=f"{path}:1: model.mask_token_id must be an integer or null"):
        load_config(str(path))


def test_layout_error_from_yaml_names_the_parallel_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hf_dir: m}\ndata: {train_files: d.jsonl}\nparallel: {tp: 2, ep: 1, etp: 1}\n")
    with pytest.raises(TrainingConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "parallel.etp=1 with parallel.ep=1 and parallel.tp=2" in message and "--" not in message


def test_every_choice_is_a_literal_and_every_field_is_documented():
    literal_fields = 0
    for section in dataclasses.fields(TrainingConfig):
        hints = get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no documentation"
            if get_origin(hints[f.name]) is Literal:
                literal_fields += 1
                assert f.default in get_args(hints[f.name])
    assert literal_fields >= 9  # dtype, attention_backend, mode, truncation, lr_schedule, diffusion x3, wandb_mode


def test_help_config_prints_every_key_with_type_default_and_doc():
    proc = subprocess.run(
        [sys.executable, "tools/train.py", "--help-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == describe_config()
    for section in dataclasses.fields(TrainingConfig):
        for f in dataclasses.fields(section.default_factory):
            assert f"  {section.name}.{f.name} (" in proc.stdout
    assert "train.warmup_steps (an integer, >= 0; default 0)\n      linear warmup from 0 to lr" in proc.stdout
    assert "diffusion.mode (one of block_diffusion, full; default block_diffusion)" in proc.stdout
