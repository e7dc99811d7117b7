"""The on-disk layout of megadiff checkpoints: what counts as complete, latest, and where it is."""

import json
import os

import pytest

from megadiff.checkpoint import latest_iteration, read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.format import (
    MCORE_CONFIG_NAME,
    META_NAME,
    TRACKER_NAME,
    build_meta,
    commit_iteration_dir,
    iteration_dir_name,
)
from megadiff.errors import CheckpointError
from megadiff.models.llada2 import ParallelLayout, preset

META = {
    "hf_config": preset("tiny"),
    "layout": ParallelLayout(tp=2),
    "dtype": "bfloat16",
    "hf_source_dir": "relative/hf",
    "extra": {"step": 3},
}


def fake_iteration(root, iteration, complete=True, name=None):
    """An iteration dir as save_checkpoint leaves it (no tensors: only what completeness depends on)."""
    path = os.path.join(root, name or iteration_dir_name(iteration))
    os.makedirs(path)
    with open(os.path.join(path, MCORE_CONFIG_NAME), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    if complete:
        with open(os.path.join(path, META_NAME), "w") as f:
            json.dump(build_meta(iteration, META, world_size=2), f)
    return path


def test_latest_iteration_picks_newest_complete_dir_only(tmp_path):
    root = str(tmp_path)
    fake_iteration(root, 10)
    fake_iteration(root, 20)
    fake_iteration(root, 30, complete=False)  # interrupted before megadiff.json
    fake_iteration(root, 40, name="iter_0000040.tmp-abc123")  # staging dir of a crashed save
    (tmp_path / TRACKER_NAME).write_text("40\n")  # a tracker never overrides completeness
    assert latest_iteration(root) == 20
    assert resolve_checkpoint_dir(root) == os.path.join(root, "iter_0000020")
    assert resolve_checkpoint_dir(root, 10) == os.path.join(root, "iter_0000010")
    assert read_meta(root)["iteration"] == 20


def test_latest_iteration_of_missing_or_empty_root_is_none(tmp_path):
    assert latest_iteration(str(tmp_path / "nope")) is None
    assert latest_iteration(str(tmp_path)) is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint_dir(str(tmp_path))


def test_resolve_refuses_incomplete_staging_and_unknown_iterations(tmp_path):
    root = str(tmp_path)
    complete = fake_iteration(root, 1)
    incomplete = fake_iteration(root, 2, complete=False)
    staging = fake_iteration(root, 3, name="iter_0000003.tmp-x")
    assert resolve_checkpoint_dir(complete) == complete
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_checkpoint_dir(incomplete)
    with pytest.raises(CheckpointError, match="staging directory"):
        resolve_checkpoint_dir(staging)
    with pytest.raises(CheckpointError, match=r"iteration 5.*complete iterations here: \[1\]"):
        resolve_checkpoint_dir(root, 5)
    with pytest.raises(CheckpointError, match="holds iteration 1"):
        resolve_checkpoint_dir(complete, 4)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint_dir(str(tmp_path / "missing"))


def test_meta_records_absolute_source_layout_and_dtype():
    meta = build_meta(3, META, world_size=4)
    assert meta["hf_source_dir"] == os.path.abspath("relative/hf")
    assert meta["layout"] == {"tp": 2, "ep": 1, "etp": 2, "pp": 1, "vpp": None}
    assert (meta["dtype"], meta["iteration"], meta["world_size"], meta["extra"]) == ("bf16", 3, 4, {"step": 3})
    assert meta["format_version"] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": {}}, "unknown field"),
        ({"hf_config": None}, "'hf_config' is required"),
        ({"dtype": "int8"}, "unsupported checkpoint dtype"),
        ({"layout": {"tp": 2, "zz": 1}}, "unknown field"),
    ],
)
def test_meta_is_validated_before_any_work(change, message):
    with pytest.raises(ValueError, match=message):
        build_meta(1, dict(META, **change), world_size=1)


def test_commit_replaces_an_older_save_of_the_same_iteration_and_updates_tracker(tmp_path):
    root = str(tmp_path)
    old = fake_iteration(root, 5)
    (tmp_path / "iter_0000005" / "old_file").write_text("x")
    staging = fake_iteration(root, 5, complete=False, name="iter_0000005.tmp-new")
    final = commit_iteration_dir(root, 5, staging, build_meta(5, META, 1))
    assert final == old and not os.path.exists(os.path.join(final, "old_file"))
    assert sorted(os.listdir(root)) == ["iter_0000005", TRACKER_NAME]
    assert (tmp_path / TRACKER_NAME).read_text().strip() == "5"
    assert latest_iteration(root) == 5
