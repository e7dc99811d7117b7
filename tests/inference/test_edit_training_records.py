"""--editing-threshold asked of a model whose records show no edit (T2T) training gets a warning
line; the records are generation_config.json (LLaDA2.1 sets editing_threshold), megadiff.json's
training config, and the megadiff_training.json an export writes beside the weights."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from megadiff.checkpoint.format import TRAINING_RECORD
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference.cli import add_decoding_arguments, decoding_options, edit_training, untrained_editing_warning
from megadiff.training.config import TrainingConfig
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(tiny HF dir, its megatron checkpoint), converted by the tool in its own process (an
    in-process conversion would start a process group in the test process)."""
    root = tmp_path_factory.mktemp("edit_records")
    hf = write_tiny_model_dir(str(root / "hf"), seed=0)
    cmd = [sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--output", str(root / "ck")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return hf, str(root / "ck")


def trained_checkpoint(converted, root, edit_ratio):
    """A copy of the converted checkpoint whose megadiff.json records a training run, as the
    trainer writes it."""
    shutil.copytree(converted[1], root)
    meta_path = os.path.join(root, "iter_0000000", "megadiff.json")
    meta = json.load(open(meta_path))
    cfg = TrainingConfig()
    cfg.diffusion.edit_ratio = edit_ratio
    meta["extra"] = {"training_config": cfg.to_dict(), "step": 7}
    json.dump(meta, open(meta_path, "w"))
    return str(root)


def warning_for(model_dir, *flags):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--iteration", type=int)
    add_decoding_arguments(parser)
    args = parser.parse_args(["--model", model_dir, *flags])
    return untrained_editing_warning(args, decoding_options(args))


def test_records_say_whether_a_model_was_trained_to_edit(converted, tmp_path):
    hf = str(shutil.copytree(converted[0], tmp_path / "hf"))
    assert edit_training(hf)[0] is None  # a download without records
    for ratio, trained in ((0.0, False), (0.25, True)):
        ckpt = trained_checkpoint(converted, tmp_path / f"ck{ratio}", ratio)
        assert edit_training(ckpt) == (trained, f"{ckpt}/iter_0000000/megadiff.json: diffusion.edit_ratio={ratio}")
        exported = convert_mcore_to_hf(ckpt, str(tmp_path / f"hf{ratio}"), progress=False, log=quiet)
        record = json.load(open(os.path.join(exported, TRAINING_RECORD)))
        assert record["diffusion"]["edit_ratio"] == ratio and record["iteration"] == 0
        assert "train_files" not in json.dumps(record)  # how it trained, not where its data lives
        assert edit_training(exported)[0] is trained
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, "editing_threshold": 0.9}, f)  # a LLaDA2.1 download
    assert edit_training(hf)[0] is True


def test_editing_on_an_untrained_model_warns_and_nowhere_else(converted, tmp_path):
    hf = converted[0]
    warning = warning_for(hf, "--editing-threshold", "0.5")
    assert warning.startswith("warning: --editing-threshold 0.5 on a model not trained for token editing (no ")
    assert warning_for(hf) is None and warning_for(hf, "--editing-threshold", "off") is None
    ckpt = trained_checkpoint(converted, tmp_path / "ck", 0.0)
    assert "megadiff.json: diffusion.edit_ratio=0.0" in warning_for(ckpt, "--editing-threshold", "0.9")
    trained = trained_checkpoint(converted, tmp_path / "ck_edit", 0.3)
    assert warning_for(trained, "--editing-threshold", "0.9") is None
