"""Bad inputs are refused before any heavy work, with an error naming the file / tensor / field;
interrupted conversions leave nothing that looks like a checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint_converters.average import average_checkpoints
from checkpoint_converters.hf_direct import DirectHFReader
from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from checkpoint_converters.moe import convert_expert_layout
from checkpoint_converters.output_dir import OUTPUT_KINDS
from checkpoint_converters.safetensors_stream import ShardedSafetensorsWriter
from megadiff.checkpoint import latest_iteration
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from megadiff.inference.loading import load_reference_from_mcore
from megadiff.models.llada2 import ConfigError, ParallelLayout
from tests.dist.launch import REPO

QUIET = dict(progress=False, log=lambda *a: None)
QKV = "model.layers.1.attention.query_key_value.weight"


def make_hf(src, out, tensors=None, config=None, shards=4):
    """A copy of HF dir `src` written in `shards` shards, with tensors / config fields changed
    (a value of None deletes the tensor / field)."""
    reader = HFCheckpointReader(src)
    state = {n: reader.get(n) for n in reader.names()}
    for name, value in (tensors or {}).items():
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    os.makedirs(out)
    size = sum(t.nbytes for t in state.values()) // shards + 1
    writer = ShardedSafetensorsWriter(out, [(n, tuple(t.shape), t.dtype) for n, t in state.items()], size)
    for name, tensor in state.items():
        writer.write(name, tensor)
    writer.close()
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    for key, value in (config or {}).items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def expect_refusal(hf_dir, tmp_path, match, error=CheckpointError, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert_hf_to_mcore(hf_dir, str(out), **kwargs, **QUIET)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def shard_of(hf_dir, name):
    return os.path.join(hf_dir, HFCheckpointReader(hf_dir).file_of(name))


def test_missing_shard_listed_in_index(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"))
    os.remove(shard_of(bad, QKV))
    expect_refusal(bad, tmp_path, r"shard 'model-0000\d-of-0000\d.safetensors' is listed but missing")


def test_truncated_safetensors(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"))
    path = shard_of(bad, QKV)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    expect_refusal(bad, tmp_path, rf"{os.path.basename(path)}: not a readable safetensors file")


def test_corrupt_safetensors(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"))
    path = shard_of(bad, QKV)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)
    expect_refusal(bad, tmp_path, rf"{os.path.basename(path)}: not a readable safetensors file")


def test_wrong_shape_tensor(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"), tensors={QKV: torch.zeros(100, 64)})
    expect_refusal(bad, tmp_path, rf"tensor '{QKV}' has shape \[100, 64\], config.json implies \[128, 64\]")


def test_missing_tensor(tiny_hf, tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    bad = make_hf(tiny_hf, str(tmp_path / "hf"), tensors={name: None})
    expect_refusal(bad, tmp_path, rf"tensor '{name}' is missing")


def test_extra_tensor(tiny_hf, tmp_path):
    name = "model.layers.1.mlp.experts.8.up_proj.weight"  # the config has 8 experts: 0..7
    bad = make_hf(tiny_hf, str(tmp_path / "hf"), tensors={name: torch.zeros(32, 64)})
    expect_refusal(bad, tmp_path, rf"unexpected tensor '{name}'")


def test_integer_or_mixed_dtype_tensors(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "a"), tensors={"model.norm.weight": torch.ones(64, dtype=torch.int32)})
    expect_refusal(bad, tmp_path, "tensor 'model.norm.weight' has dtype I32")
    bad = make_hf(tiny_hf, str(tmp_path / "b"), tensors={QKV: torch.zeros(128, 64, dtype=torch.bfloat16)})
    expect_refusal(bad, tmp_path, rf"tensor '{QKV}' is BF16 but .* is F32")


def test_unsupported_model_type(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"), config={"model_type": "llama"})
    # the model registry (issue 28): an unknown model_type lists the known ones
    expect_refusal(
        bad, tmp_path, "model_type: 'llama' is not a model megadiff knows; known model types: ", error=ConfigError
    )


def test_missing_config_field(tiny_hf, tmp_path):
    bad = make_hf(tiny_hf, str(tmp_path / "hf"), config={"num_experts": None})
    expect_refusal(bad, tmp_path, "num_experts: required field is missing", error=ConfigError)


@pytest.mark.parametrize(
    "layout, match",
    [
        (ParallelLayout(tp=4), r"num_key_value_heads=2 is not divisible by --tp 4; use --tp 1, 2"),
        (ParallelLayout(ep=3), r"num_experts=8 is not divisible by --ep 3"),
        (ParallelLayout(pp=3), r"num_hidden_layers=4 is not divisible by pp\*vpp=3"),
    ],
)
def test_layout_that_does_not_divide(tiny_hf, tmp_path, layout, match):
    expect_refusal(tiny_hf, tmp_path, match, error=ConfigError, layout=layout)


def test_output_that_exists_is_refused_without_overwrite(tiny_hf, tiny_hf_merged, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        convert_hf_to_mcore(tiny_hf, str(out), **QUIET)
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        convert_expert_layout(tiny_hf, str(out), "merge", **QUIET)
    assert os.listdir(out) == ["keep"]


@pytest.mark.parametrize("tool", ["convert_hf_to_mcore", "convert_mcore_to_hf", "moe_convertor", "average"])
def test_overwrite_replaces_only_an_empty_dir_or_an_earlier_output_of_its_kind(
    single_process_run, tiny_hf, tiny_hf_merged, tmp_path, tool
):
    """--overwrite naming a dir of the user's files, or an output of the other kind, is refused in
    one line naming a file in the way, before any work, and nothing in it is touched."""
    ck = single_process_run["ck111"]
    run, kind = {
        "convert_hf_to_mcore": (lambda out: convert_hf_to_mcore(tiny_hf, out, overwrite=True, **QUIET), "mcore"),
        "convert_mcore_to_hf": (lambda out: convert_mcore_to_hf(ck, out, overwrite=True, **QUIET), "hf"),
        "moe_convertor": (
            lambda out: convert_expert_layout(tiny_hf_merged, out, "split", overwrite=True, **QUIET),
            "hf",
        ),
        "average": (lambda out: average_checkpoints(ck, out, iterations=[0], overwrite=True, **QUIET), "mcore"),
    }[tool]
    other = {"mcore": ["config.json", "model.safetensors"], "hf": ["latest_checkpointed_iteration.txt"]}[kind]
    for names, this in (
        (["thesis.tex", "notes"], "neither"),
        (other, "a " + OUTPUT_KINDS["hf" if kind == "mcore" else "mcore"]),
    ):
        user = tmp_path / names[0].replace(".", "_")
        user.mkdir()
        for name in names:
            (user / name).write_text("precious")
        with pytest.raises(CheckpointError) as refused:
            run(str(user))
        assert str(refused.value) == (
            f"{user}: --overwrite replaces only an empty directory or an earlier {OUTPUT_KINDS[kind]}, and this is "
            f"{this}: {sorted(names)[0]}{' (and 1 more)' if len(names) > 1 else ''} is in the way; choose another "
            f"output directory, or empty it yourself"
        )
        assert sorted(os.listdir(user)) == sorted(names) and all((user / n).read_text() == "precious" for n in names)
    if tool == "moe_convertor":  # an empty dir is replaced (an earlier output: test_checkpoint_replace)
        (tmp_path / "empty").mkdir()
        run(str(tmp_path / "empty"))
        assert "model.safetensors.index.json" in os.listdir(tmp_path / "empty")


def test_output_inside_the_input_is_refused(tiny_hf):
    with pytest.raises(CheckpointError, match="overlaps the input"):
        convert_expert_layout(tiny_hf, os.path.join(tiny_hf, "sub"), "merge", **QUIET)


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_interrupted_hf_to_mcore_leaves_nothing(single_process_run):
    report = single_process_run["report"]["interrupt"]
    out = single_process_run["interrupted"]
    assert report["raised"] == "KeyboardInterrupt" and report["reads"] == 6, report
    assert not report["output_exists"] and report["leftovers"] == []
    assert latest_iteration(out) is None


def _interrupt_after(monkeypatch, cls, method, calls):
    original = getattr(cls, method)
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_interrupted_mcore_to_hf_and_moe_leave_nothing(single_process_run, tiny_hf, tmp_path, monkeypatch):
    from megadiff.checkpoint.reader import DistCheckpointReader

    _interrupt_after(monkeypatch, DistCheckpointReader, "read_many", 3)
    with pytest.raises(KeyboardInterrupt):
        convert_mcore_to_hf(
            single_process_run["ck111"], str(tmp_path / "hf"), max_shard_size="100KB", budget_bytes=4096, **QUIET
        )
    _interrupt_after(monkeypatch, DirectHFReader, "spans", 20)
    with pytest.raises(KeyboardInterrupt):
        convert_expert_layout(tiny_hf, str(tmp_path / "merged"), "merge", io_mode="fast", **QUIET)
    assert os.listdir(tmp_path) == []  # no output, no staging dir: nothing an HF loader could pick


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_crashed_save_is_never_latest(single_process_run, tmp_path):
    """A hard kill (no cleanup) leaves a staging dir or an iteration without megadiff.json."""
    root = tmp_path / "root"
    shutil.copytree(single_process_run["ck111"], root)
    shutil.copytree(root / "iter_0000000", root / "iter_0000009.tmp-deadbeef")  # killed before rename
    shutil.copytree(root / "iter_0000000", root / "iter_0000008")
    os.remove(root / "iter_0000008" / "megadiff.json")  # killed before megadiff.json
    (root / "latest_checkpointed_iteration.txt").write_text("9\n")
    assert latest_iteration(str(root)) == 0
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_reference_from_mcore(str(root / "iter_0000008"))


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_bad_megatron_checkpoints_are_refused_before_export(single_process_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(single_process_run["ck111"], ck)
    data = ck / "iter_0000000" / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: truncated"):
        convert_mcore_to_hf(str(ck), str(tmp_path / "hf"), **QUIET)
    with pytest.raises(CheckpointError, match="no complete checkpoint for iteration 3"):
        convert_mcore_to_hf(single_process_run["ck111"], str(tmp_path / "hf"), iteration=3, **QUIET)
    other = tmp_path / "other"  # megadiff.json says 16 experts: the stored tensors do not fit
    shutil.copytree(single_process_run["ck111"], other)
    meta_path = other / "iter_0000000" / "megadiff.json"
    meta = json.loads(meta_path.read_text())
    meta["hf_config"]["num_experts"] = 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"router.weight' has global shape \[8, 64\], the recorded config implies \[16, 64\]"
    ):
        convert_mcore_to_hf(str(other), str(tmp_path / "hf"), **QUIET)
    assert not (tmp_path / "hf").exists()


def test_cli_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "convert_mcore_to_hf.py"),
            "--mcore-dir",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2  # megadiff.errors.USER_ERROR_EXIT
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: checkpoint directory not found"]
