"""Continued pretraining's bad input is refused before any process group or model is built, naming the
key or file: indexed data files, blends, block schedules, validation, LR decay, embedding noise."""

import os

import numpy
import pytest
import torch

from megadiff.data.rows import DataError
from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.loop import Trainer
from megadiff.training.phases import phase_at, run_phases


def write_dataset(prefix: str, documents, dtype=numpy.uint16) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in documents:
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")


@pytest.fixture
def cpt(tiny_run_dir, tmp_path):
    """(config path, data prefix): a valid blend of one small dataset."""
    prefix = str(tmp_path / "data")
    write_dataset(prefix, [[5, 6, 7, 0], [8, 9, 0]] * 40)
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(
        f"model: {{hf_dir: {tiny_run_dir / 'hf'}}}\n"
        f"data: {{blend: [{prefix}], max_seq_len: 32, index_cache_dir: {tmp_path / 'cache'}}}\n"
        "train: {steps: 4, global_batch_size: 2}\n"
        "logging: {progress_bar: false}\n"
    )
    return str(cfg), prefix


def refused_before_build(cfg, error, match):
    with pytest.raises(error, match=match):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def test_missing_idx_is_refused_naming_it(cpt):
    path, prefix = cpt
    os.unlink(prefix + ".idx")
    refused_before_build(load_config(path), DataError, f"{prefix}.idx: missing")


def test_bin_idx_mismatch_is_refused_naming_the_bin(cpt):
    path, prefix = cpt
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    refused_before_build(load_config(path), DataError, f"{prefix}.bin: .* bytes, but {prefix}.idx indexes")


def test_token_ids_at_or_above_the_vocabulary_are_refused_naming_the_file(cpt, tmp_path):
    path, _ = cpt
    bad = str(tmp_path / "bad")
    write_dataset(bad, [[5, 6, 0], [7, 512, 0]] * 20)  # the tiny model has 512 ids
    refused_before_build(load_config(path, [f"data.blend=[{bad}]"]), DataError, f"{bad}.bin: holds token id 512")


@pytest.mark.parametrize(
    "blend, match",
    [
        ("[0.5, A, 0.0, B]", r"data.blend\[2\]: weight 0.0 of B must be a finite number > 0"),
        ("[0.5, A, -1, B]", r"data.blend\[2\]: weight -1(\.0)? of B"),
        ("[0.5, A, 0.5]", "data.blend has 3 entries with weights among them"),
        ("[A, 0.5]", r"data.blend\[0\]='A' is not a weight"),
    ],
)
def test_bad_blends_are_refused_at_config_load(cpt, blend, match):
    with pytest.raises(TrainingConfigError, match=match):
        load_config(cpt[0], [f"data.blend={blend}"])


@pytest.mark.parametrize(
    "schedule, match",
    [
        (
            "[{steps: 2, block_size: 4}, {steps: 2, block_size: 12}]",
            r"block_schedule\[1\].block_size=12 does not divide data.max_seq_len=32",
        ),
        ("[{steps: 2, block_size: 4}, {steps: 1, mode: full}]", "the phases cover 3 steps but train.steps=4"),
        ("[{steps: 4, mode: full, block_size: 4}]", r"block_schedule\[0\]: a full phase has no block_size"),
        ("[{steps: 4, blocksize: 4}]", r"block_schedule\[0\]: unknown key 'blocksize'"),
    ],
)
def test_bad_block_schedules_are_refused_at_config_load(cpt, schedule, match):
    with pytest.raises(TrainingConfigError, match=match):
        load_config(cpt[0], [f"diffusion.block_schedule={schedule}"])


def test_a_schedule_gives_each_step_its_phase(cpt):
    cfg = load_config(
        cpt[0],
        ["diffusion.block_schedule=[{steps: 1, block_size: 1}, {steps: 2, mode: full}, {steps: 1, block_size: 32}]"],
    )
    phases = run_phases(cfg)
    assert [phase_at(phases, s).name for s in range(4)] == ["bd1", "full", "full", "bd32"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["train.eval_interval=2", "data.split=100,0,0"],
            "train.eval_interval=2 needs validation data, but data.split",
        ),
        (["train.lr_schedule=wsd"], "train.lr_schedule=wsd needs train.lr_decay_steps"),
        (["train.lr_decay_steps=2"], "train.lr_decay_steps is set but train.lr_schedule=cosine"),
        (["diffusion.mask_embedding_noise={std: 0.1}"], "diffusion.mask_embedding_noise=.*expected"),
        (["data.split=98,x"], "data.split='98,x'"),
        (["data.mock=true"], "data.blend and data.mock are exclusive"),
    ],
)
def test_bad_pretraining_settings_are_refused_at_config_load(cpt, overrides, match):
    with pytest.raises(TrainingConfigError, match=match):
        load_config(cpt[0], overrides)


def test_eval_interval_without_validation_rows_is_refused_for_sft(tiny_run_dir):
    with pytest.raises(TrainingConfigError, match="train.eval_interval=5 needs validation data: set data.valid_files"):
        load_config(str(tiny_run_dir / "cfg.yaml"), ["train.eval_interval=5"])


def test_blend_and_train_files_are_exclusive(tiny_run_dir, cpt):
    with pytest.raises(TrainingConfigError, match="data.train_files and data.blend are exclusive"):
        load_config(str(tiny_run_dir / "cfg.yaml"), [f"data.blend=[{cpt[1]}]"])


def test_blend_without_a_cache_dir_is_refused_naming_the_keys(cpt):
    cfg = load_config(cpt[0], ["data.index_cache_dir=null"])
    refused_before_build(cfg, TrainingConfigError, "set checkpoint.save_dir .* or data.index_cache_dir")
