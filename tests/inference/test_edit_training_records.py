"""--editing-threshold asked of a model whose records show no edit (T2T) training gets a warning
line; the records are generation_config.json (LLaDA2.1 sets editing_threshold), megadiff.json's
training config, and the megadiff_training.json an export writes beside the weights."""

import argparse
import json
import os

from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from megadiff.checkpoint.format import TRAINING_RECORD
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference.cli import add_decoding_arguments, decoding_options, edit_training, untrained_editing_warning
from megadiff.training.config import TrainingConfig


def quiet(*_):
    pass


def trained_checkpoint(hf_dir, root, edit_ratio):
    """A converted checkpoint whose megadiff.json records a training run, as the trainer writes it."""
    iteration_dir = convert_hf_to_mcore(hf_dir, str(root), progress=False, log=quiet)
    meta_path = os.path.join(iteration_dir, "megadiff.json")
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


def test_records_say_whether_a_model_was_trained_to_edit(tmp_path):
    hf = write_tiny_model_dir(str(tmp_path / "hf"), seed=0)
    assert edit_training(hf)[0] is None  # a download without records
    for ratio, trained in ((0.0, False), (0.25, True)):
        ckpt = trained_checkpoint(hf, tmp_path / f"ck{ratio}", ratio)
        assert edit_training(ckpt) == (trained, f"{ckpt}/iter_0000000/megadiff.json: diffusion.edit_ratio={ratio}")
        exported = convert_mcore_to_hf(ckpt, str(tmp_path / f"hf{ratio}"), progress=False, log=quiet)
        record = json.load(open(os.path.join(exported, TRAINING_RECORD)))
        assert record["diffusion"]["edit_ratio"] == ratio and record["iteration"] == 0
        assert "train_files" not in json.dumps(record)  # how it trained, not where its data lives
        assert edit_training(exported)[0] is trained
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, "editing_threshold": 0.9}, f)  # a LLaDA2.1 download
    assert edit_training(hf)[0] is True


def test_editing_on_an_untrained_model_warns_and_nowhere_else(tmp_path):
    hf = write_tiny_model_dir(str(tmp_path / "hf"), seed=0)
    warning = warning_for(hf, "--editing-threshold", "0.5")
    assert warning.startswith("warning: --editing-threshold 0.5 on a model not trained for token editing (no ")
    assert warning_for(hf) is None and warning_for(hf, "--editing-threshold", "off") is None
    ckpt = trained_checkpoint(hf, tmp_path / "ck", 0.0)
    assert "megadiff.json: diffusion.edit_ratio=0.0" in warning_for(ckpt, "--editing-threshold", "0.9")
    trained = trained_checkpoint(hf, tmp_path / "ck_edit", 0.3)
    assert warning_for(trained, "--editing-threshold", "0.9") is None
