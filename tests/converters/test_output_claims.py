"""A converter's output is claimed atomically and never half-written: of two conversions to one
output without --overwrite only one succeeds, and a full disk during a merge, an export or a
conversion ends in one error naming the file, the disk and its free space, with nothing left."""

import os
import subprocess
import sys

import pytest

import checkpoint_converters.moe as moe
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from checkpoint_converters.moe import convert_expert_layout
from megadiff.errors import CheckpointError
from megadiff.files.disk_space import NoSpaceError
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from tests.dist.launch import REPO, worker_env

QUIET = dict(progress=False, log=lambda *a: None)


def test_two_conversions_to_one_output_do_not_both_succeed(tiny_hf, tiny_hf_merged, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    write = moe.write_sharded_safetensors

    def write_while_another_conversion_finishes(*args, **kwargs):
        monkeypatch.setattr(moe, "write_sharded_safetensors", write)
        convert_expert_layout(tiny_hf_merged, out, "split", **QUIET)  # the other one, started later, ends first
        return write(*args, **kwargs)

    monkeypatch.setattr(moe, "write_sharded_safetensors", write_while_another_conversion_finishes)
    with pytest.raises(CheckpointError, match=rf"{out}: another conversion wrote it while this one ran; its output"):
        convert_expert_layout(tiny_hf, out, "merge", **QUIET)
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in HFCheckpointReader(out).names()  # the other's: split
    assert os.listdir(tmp_path) == ["out"]  # no staging dir left


def full_disk_message(tiny_filesystem, out) -> str:
    return rf"^no space left on tmpfs \(mounted at {tiny_filesystem}\) while writing {out}\S*: .*MB free"


@pytest.mark.repeat  # stack-independent: stack (b) runs it only in the full set
def test_a_full_disk_during_a_merge_is_named_and_leaves_nothing(tiny_hf, tiny_filesystem):
    out = tiny_filesystem / "merged"
    with pytest.raises(NoSpaceError, match=full_disk_message(tiny_filesystem, out)):
        convert_expert_layout(tiny_hf, str(out), "merge", **QUIET)  # 1.2 MB into 1 MB
    assert os.listdir(tiny_filesystem) == []


@pytest.mark.slow  # the converted checkpoint comes from the suite's converter launch; one more conversion
@pytest.mark.repeat
def test_a_full_disk_during_an_export_and_a_conversion_is_named_and_leaves_nothing(
    single_process_run, tiny_hf, tiny_filesystem
):
    out = tiny_filesystem / "hf"
    with pytest.raises(NoSpaceError, match=full_disk_message(tiny_filesystem, out)):
        convert_mcore_to_hf(single_process_run["ck111"], str(out), **QUIET)
    assert os.listdir(tiny_filesystem) == []
    out = tiny_filesystem / "ckpt"
    proc = subprocess.run(
        [sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", tiny_hf, "--output", str(out), "--no-progress"]
        + ["--io", "fast"],  # the engine's writer names the file it was writing
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # one line: the file in the output, the disk, its free space
    assert f"no space left on tmpfs (mounted at {tiny_filesystem}) while writing {out}/iter_0000000/" in last, last
    assert last.endswith("MB free; free some space or write ckpt to a larger disk (the partial output was deleted)")
    assert "Traceback" not in proc.stderr and os.listdir(tiny_filesystem) == []
