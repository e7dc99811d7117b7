"""Bad input stops the trainer before any process group or model is built."""

import json

import pytest
import torch

from megadiff.data.rows import DataError
from megadiff.models.llada2 import ConfigError
from megadiff.training.config import load_config
from megadiff.training.loop import Trainer


def test_malformed_row_stops_before_model_is_built(tiny_run_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"data.train_files={bad}"])
    with pytest.raises(DataError, match=f"{bad}:2: .*robot"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def test_layout_not_dividing_model_stops_before_model_is_built(tiny_run_dir):
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), ["parallel.tp=4"])
    with pytest.raises(
        ConfigError, match="num_key_value_heads=2 is not divisible by parallel.tp=4; use parallel.tp=1, 2"
    ):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()
