"""One run per save_dir, every output path checked before the model is built, a damaged save_dir
stops the run before it trains, a full disk is named, and child processes die with their parent."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megadiff.checkpoint.format import META_NAME, build_meta
from megadiff.checkpoint.lock import SaveDirInUseError, SaveDirLock
from megadiff.errors import CheckpointError
from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.disk_space import NoSpaceError, no_space_error
from megadiff.training.loop import Trainer
from tests.dist.launch import REPO

HOLD_LOCK = (
    "import sys, time; from megadiff.checkpoint.lock import SaveDirLock; "
    "lock = SaveDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, **kwargs
    )


@pytest.fixture
def other_run_holding(tmp_path):
    """A live process holding tmp_path/ckpt, as a running trainer does."""
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    proc = python("-c", HOLD_LOCK, save_dir)
    assert proc.stdout.readline().strip() == "held"
    yield save_dir, proc
    proc.kill()
    proc.wait()


def test_second_trainer_on_a_held_save_dir_refuses_before_building(tiny_run_dir, other_run_holding):
    save_dir, proc = other_run_holding
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"checkpoint.save_dir={save_dir}"])
    with pytest.raises(SaveDirInUseError, match=rf"{save_dir}: in use by another run \(pid {proc.pid} on "):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def test_lock_of_a_killed_run_does_not_block(other_run_holding):
    save_dir, proc = other_run_holding
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (save_dir / ".megadiff.lock").exists()  # the file stays; the kernel dropped the lock
    with SaveDirLock(str(save_dir)) as lock:
        assert lock.held
        with pytest.raises(SaveDirInUseError, match=f"pid {os.getpid()}"):
            SaveDirLock(str(save_dir)).acquire()  # and it is exclusive again


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.save_dir={file}", r"checkpoint.save_dir=.*afile: exists and is not a directory"),
        ("checkpoint.save_dir={file}/sub", r"checkpoint.save_dir=.*afile/sub: cannot be created, .*afile is a file"),
        (
            "checkpoint.save_dir=/proc/megadiff-ckpt",
            r"checkpoint.save_dir=/proc/megadiff-ckpt: cannot be created in /proc",
        ),
        (
            "logging.metrics_file={tmp}/missing/m.jsonl",
            r"logging.metrics_file=.*missing/m.jsonl: directory .*missing "
            r"does not exist",
        ),
        ("logging.tensorboard_dir={file}", r"logging.tensorboard_dir=.*afile: exists and is not a directory"),
    ],
)
def test_unusable_output_stops_before_anything_is_built(tiny_run_dir, tmp_path, override, message):
    (tmp_path / "afile").write_text("x")
    override = override.format(file=tmp_path / "afile", tmp=tmp_path)
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [override])
    with pytest.raises(TrainingConfigError, match=message):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def fake_checkpoint(save_dir, iteration, meta_text=None):
    path = save_dir / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    meta = {"hf_config": {"model_type": "llada2_moe"}, "layout": {"tp": 1}, "dtype": "fp32"}
    (path / META_NAME).write_text(meta_text or json.dumps(build_meta(iteration, meta, 1)))
    (save_dir / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


@pytest.mark.parametrize(
    "case, message",
    [
        ("damaged", r"cannot resume from .*iter_0000006 is damaged: .*megadiff.json:1: invalid JSON.*iteration 4"),
        ("resume_false", r"holds checkpoints \(latest iteration 4\) and checkpoint.resume=false"),
    ],
)
def test_save_dir_that_cannot_be_resumed_stops_before_training(tiny_run_dir, tmp_path, case, message):
    save_dir = tmp_path / "ckpt"
    fake_checkpoint(save_dir, 4)
    if case == "damaged":
        fake_checkpoint(save_dir, 6, meta_text="{truncated")
    overrides = [f"checkpoint.save_dir={save_dir}"] + (["checkpoint.resume=false"] if case == "resume_false" else [])
    with pytest.raises(CheckpointError, match=message):
        Trainer(load_config(str(tiny_run_dir / "cfg.yaml"), overrides))
    assert not torch.distributed.is_initialized()
    assert not SaveDirLock(str(save_dir)).acquire().release()  # the refused run let go of the lock


def test_failed_write_on_a_full_disk_is_named(tmp_path, monkeypatch):
    import shutil

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    error = no_space_error(str(tmp_path), 3 * 10**9, error=torch_error)
    assert isinstance(error, NoSpaceError)
    assert "no space left on " in str(error) and "needed ~3.0 GB, 0.0 MB free" in str(error)
    assert no_space_error(str(tmp_path), 10, error=ValueError("something else")) is None


def test_torch_short_write_on_a_really_full_disk_is_named(tiny_filesystem):
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        torch.save(torch.zeros(2**20), tiny_filesystem / "x.pt")
    error = no_space_error(str(tiny_filesystem), 4 * 2**20, error=raised.value)
    assert str(error).startswith(f"no space left on tmpfs (mounted at {tiny_filesystem}) ")
    assert "needed ~4.2 MB" in str(error)


@pytest.mark.slow
@pytest.mark.repeat  # stack-independent: stack (b) runs it only in the full set
def test_trainer_save_on_a_full_disk_says_no_space(tiny_run_dir, tiny_filesystem):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "tools/train.py",
            str(tiny_run_dir / "cfg.yaml"),
            "train.steps=1",
            f"checkpoint.save_dir={tiny_filesystem / 'ckpt'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"no space left on tmpfs (mounted at {tiny_filesystem})" in out and "needed ~" in out, out[-3000:]
    assert "unexpected pos" not in out
    assert sorted(os.listdir(tiny_filesystem / "ckpt")) == [".megadiff.lock"]  # nothing half-written


CHILDREN = """
import multiprocessing as mp, os, sys, time
from megadiff.platform.child_processes import make_children_die_with_parent
from megatron.core.dist_checkpointing.strategies import filesystem_async
# megatron-core 0.16 names it _get_write_results_queue, 0.19 get_write_results_queue
results_queue = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue

def sleep():
    time.sleep(600)

if __name__ == "__main__":
    if sys.argv[1] == "on":
        make_children_die_with_parent()
    results_queue()  # the Manager server dist_checkpointing's writer keeps (spawn)
    kids = [mp.get_context(m).Process(target=sleep) for m in ("fork", "spawn")]
    for k in kids:
        k.start()
    print(" ".join(str(p.pid) for p in mp.active_children()), flush=True)
    time.sleep(600)
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.slow
@pytest.mark.repeat  # process-group handling of the OS, not of the installed versions
def test_children_die_with_a_killed_parent(tmp_path, hook="on"):  # hook="off": all 3 stay behind
    script = tmp_path / "parent.py"
    script.write_text(CHILDREN)
    parent = python(script, hook, start_new_session=True)
    children = [int(p) for p in parent.stdout.readline().split()]
    assert len(children) == 3
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, children)):
        time.sleep(0.1)
    left = [p for p in children if alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [] if hook == "on" else left, f"hook {hook}: children left {left}"


def test_log_interval_zero_is_refused_when_the_config_loads(tiny_run_dir):
    # was a ZeroDivisionError after step 1; the typed config refuses it before anything exists
    with pytest.raises(TrainingConfigError, match=r"logging.log_interval must be >= 1, got 0"):
        load_config(str(tiny_run_dir / "cfg.yaml"), ["logging.log_interval=0"])


# ---- files the trainer writes into a save_dir it may have received; outputs vs inputs -------------


def test_a_lock_file_that_is_a_link_or_a_second_name_is_refused_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for plant in (os.symlink, os.link):
        save_dir = tmp_path / plant.__name__
        save_dir.mkdir()
        plant(victim, save_dir / ".megadiff.lock")
        with pytest.raises(CheckpointError, match=r"\.megadiff\.lock (is a symbolic link|has other hard links)"):
            SaveDirLock(str(save_dir)).acquire()
    assert victim.read_text() == "precious"


def test_the_tracker_and_metrics_file_never_write_through_a_link(tiny_run_dir, tmp_path):
    from megadiff.checkpoint.format import write_text_atomic

    victim = tmp_path / "victim"
    victim.write_text("precious")
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    os.symlink(victim, tracker)
    write_text_atomic(str(tracker), "7\n")  # replaces the link, not its target
    assert victim.read_text() == "precious" and tracker.read_text() == "7\n" and not tracker.is_symlink()
    os.symlink(victim, tmp_path / "metrics.jsonl")
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"logging.metrics_file={tmp_path / 'metrics.jsonl'}"])
    with pytest.raises(TrainingConfigError, match=r"logging.metrics_file=.*metrics.jsonl is a symbolic link"):
        Trainer(cfg)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logging.metrics_file={data}/metrics.jsonl"], r"logging.metrics_file .*metrics.jsonl is inside the input "),
        (
            ["data.train_files={train}", "logging.metrics_file={train}"],
            r"logging.metrics_file .*train.jsonl is the input data.train_files",
        ),
        (["checkpoint.save_dir={hf}"], r"checkpoint.save_dir .*hf is the input model.hf_dir"),
        (
            ["model.init_from_mcore={tmp}/ck/iter_0000000", "checkpoint.save_dir={tmp}/ck"],
            r"checkpoint.save_dir .*ck contains the input model.init_from_mcore",
        ),
    ],
    ids=["metrics_in_data_dir", "metrics_is_data", "save_dir_is_model", "save_dir_holds_init"],
)
def test_a_run_whose_output_is_one_of_its_inputs_stops_before_anything_is_built(
    tiny_run_dir, tmp_path, overrides, message
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(tiny_run_dir / "train.jsonl", data / "train.jsonl")
    values = dict(data=data, train=data / "train.jsonl", hf=tiny_run_dir / "hf", tmp=tmp_path)
    overrides = [f"data.train_files={data}"] + [o.format(**values) for o in overrides]
    with pytest.raises(TrainingConfigError, match=message):
        Trainer(load_config(str(tiny_run_dir / "cfg.yaml"), overrides))
    assert sorted(os.listdir(data)) == ["train.jsonl"] and not torch.distributed.is_initialized()


def test_a_config_json_of_a_larger_model_than_the_weights_stops_before_anything_is_built(
    tiny_run_dir, tmp_path, monkeypatch
):
    import megadiff.training.setup as setup

    hf = shutil.copytree(tiny_run_dir / "hf", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, hidden_size=8192, intermediate_size=65536)))
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor '.*' has shape \[\d+, 64\], config.json implies"
    ):
        Trainer(load_config(str(tiny_run_dir / "cfg.yaml"), [f"model.hf_dir={hf}"]))
    assert not torch.distributed.is_initialized()


def checkpoint_of_run(save_dir, cfg, data_files=None):
    """A (fake) checkpoint of `cfg`'s run at iteration 4, recording its config (and `data_files`, the
    data fingerprints: None as before they were recorded) as the trainer does."""
    path = save_dir / "iter_0000004"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    hf_config = json.loads((Path(cfg.model.hf_dir) / "config.json").read_text())
    extra = {"training_config": cfg.to_dict(), **({"data_files": data_files} if data_files is not None else {})}
    meta = {"hf_config": hf_config, "layout": {"tp": 1}, "dtype": "fp32", "extra": extra}
    (path / META_NAME).write_text(json.dumps(build_meta(4, meta, 1)))
    (save_dir / "latest_checkpointed_iteration.txt").write_text("4\n")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.train_files={memorise}"],
            r"data.train_files changed \('.*train.jsonl' -> '.*memorise.jsonl'\); the checkpoint's data position "
            r"belongs to the data it was saved with. Set checkpoint.allow_new_data=true",
        ),
        (["train.seed=7"], r"train.seed changed \(42 -> 7\).*checkpoint.allow_new_data=true"),
        (["train.adam_beta2=0.9"], r"train.adam_beta2 changed \(0.95 -> 0.9\): the restored optimizer state carries"),
    ],
    ids=["data_files", "seed", "adam_beta2"],
)
def test_a_resume_with_a_change_that_cannot_take_effect_stops_before_anything_is_built(
    tiny_run_dir, tmp_path, overrides, message
):
    save_dir = tmp_path / "ckpt"
    base = [f"checkpoint.save_dir={save_dir}"]
    checkpoint_of_run(save_dir, load_config(str(tiny_run_dir / "cfg.yaml"), base))
    changed = [o.format(memorise=tiny_run_dir / "memorise.jsonl") for o in overrides]
    with pytest.raises(CheckpointError, match=rf"cannot resume .*iter_0000004 with this config: {message}"):
        Trainer(load_config(str(tiny_run_dir / "cfg.yaml"), base + changed))
    assert not torch.distributed.is_initialized()


def test_resume_notes_say_which_values_apply(tiny_run_dir, tmp_path):
    from megadiff.training.resume_config import compare_with_checkpoint

    save_dir = tmp_path / "ckpt"
    base = [f"checkpoint.save_dir={save_dir}"]
    checkpoint_of_run(save_dir, load_config(str(tiny_run_dir / "cfg.yaml"), base))
    hf_config = json.loads((tiny_run_dir / "hf" / "config.json").read_text())
    changes = ["train.lr=2e-3", f"data.train_files={tiny_run_dir / 'memorise.jsonl'}", "checkpoint.allow_new_data=true"]
    lines = []
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), base + changes + ["logging.log_interval=5"])
    plan = compare_with_checkpoint(cfg, str(save_dir / "iter_0000004"), hf_config, lines.append)
    assert plan.new_data
    assert lines == [
        f"resume: data.train_files changed ('{tiny_run_dir / 'train.jsonl'}' -> '{tiny_run_dir / 'memorise.jsonl'}'); "
        "checkpoint.allow_new_data=true: the new data is read from its beginning, weights, optimizer and LR "
        "schedule resume",
        "resume: train.lr changed (0.001 -> 0.002): this run's value applies from the resumed step on (the LR schedule)",
    ]
    other = dict(hf_config, num_hidden_layers=hf_config["num_hidden_layers"] + 2)
    with pytest.raises(CheckpointError, match=r"it holds another model \(num_hidden_layers=4 in the checkpoint, 6 in"):
        compare_with_checkpoint(cfg, str(save_dir / "iter_0000004"), other, lines.append)


@pytest.mark.parametrize("recorded", [True, False], ids=["fingerprinted", "older_checkpoint"])
def test_resume_compares_the_data_files_content_and_realpath_not_their_spelling(tiny_run_dir, tmp_path, recorded):
    """Edited at the same path: refused unless allow_new_data (a checkpoint written before the
    fingerprints resumes as before, by path); the same file through a link: the same data."""
    from megadiff.training.data_fingerprint import data_fingerprints
    from megadiff.training.resume_config import compare_with_checkpoint

    data, link, save_dir = tmp_path / "train.jsonl", tmp_path / "link.jsonl", tmp_path / "ckpt"
    shutil.copyfile(tiny_run_dir / "train.jsonl", data)
    os.symlink(data, link)
    cfg_yaml, hf_config = str(tiny_run_dir / "cfg.yaml"), json.loads((tiny_run_dir / "hf" / "config.json").read_text())
    base = [f"checkpoint.save_dir={save_dir}"]
    checkpoint_of_run(
        save_dir,
        load_config(cfg_yaml, base + [f"data.train_files={data}"]),
        data_fingerprints(str(data)) if recorded else None,
    )
    ckpt, lines = str(save_dir / "iter_0000004"), []

    def compare(*overrides):
        return compare_with_checkpoint(load_config(cfg_yaml, base + list(overrides)), ckpt, hf_config, lines.append)

    assert not compare(f"data.train_files={link}").new_data and lines == []  # the same file reached by a link
    text = data.read_text()
    edits = {"appended": text + text.splitlines(keepends=True)[0], "same size": text.replace("1", "2", 1)}
    for how, edited in edits.items():
        data.write_text(edited)
        if not recorded:
            assert not compare(f"data.train_files={data}").new_data and lines == [], how  # paths only, as before
            continue
        size = f"size {len(text)} -> {len(edited)} bytes" if how == "appended" else "same size, other content"
        changed = f"data.train_files: {data} changed since the checkpoint ({size})"
        with pytest.raises(
            CheckpointError, match=rf"with this config: {re.escape(changed)}; .*checkpoint.allow_new_data=true"
        ):
            compare(f"data.train_files={link}")
        assert compare(f"data.train_files={link}", "checkpoint.allow_new_data=true").new_data, how
        assert (
            lines.pop() == f"resume: {changed}; checkpoint.allow_new_data=true: the new data is read from its "
            "beginning, weights, optimizer and LR schedule resume"
        )
