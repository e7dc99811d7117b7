"""Per-step metrics reach the jsonl file and tensorboard."""

import json

from megadiff.training.config import load_config
from megadiff.training.logging import MetricsLogger
from megadiff.training.loop import StepResult


def test_metrics_file_and_tensorboard_get_every_step(tmp_path):
    cfg = load_config(
        None,
        [
            "model.hf_dir=m",
            "data.train_files=d",
            "logging.progress_bar=false",
            f"logging.metrics_file={tmp_path / 'm.jsonl'}",
            f"logging.tensorboard_dir={tmp_path / 'tb'}",
        ],
    )
    logger = MetricsLogger(cfg, total_steps=2)
    logger.log(StepResult(1, 2.5, 1e-3, 0.7, 1000, False), seconds=0.5)
    logger.log(StepResult(2, float("nan"), 1e-3, None, 1000, True), seconds=0.5)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.5 and records[0]["tokens_per_s"] == 2000 and records[1]["skipped"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
