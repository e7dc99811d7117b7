"""Replacing a checkpoint never leaves a moment without one: a process killed at any rename or write
step of a trainer save or a converter --overwrite leaves the old or the new copy loadable, and the
next run resumes from it. Leftovers are cleaned only when provably stale; damage is reported."""

import json
import os
import shutil

import pytest

from checkpoint_converters.output_dir import check_output_dir, clean_stale_leftovers, publish
from megadiff.checkpoint import format as fmt
from megadiff.checkpoint.format import (
    CRASH_ENV,
    CRASH_EXIT_CODE,
    MCORE_CONFIG_NAME,
    META_NAME,
    TRACKER_NAME,
    build_meta,
    commit_iteration_dir,
    complete_iterations,
    iteration_dir_name,
    iteration_dirs,
    latest_iteration,
    read_meta,
    resolve_checkpoint_dir,
    staging_path,
)
from megadiff.errors import CheckpointError
from megadiff.inference.loading import is_mcore_checkpoint
from megadiff.models.llada2 import ParallelLayout, preset
from megadiff.training.checkpointing import claim_save_dir, prune_checkpoints, resume_iteration

META = {"hf_config": preset("tiny"), "layout": ParallelLayout(), "dtype": "fp32"}
NEW_SAVE = ["meta-written", "meta-renamed", "replace-start", "replace-renamed", "tracker-written", "tracker-renamed"]
RESAVE = {  # the steps of a save that replaces an existing complete iteration
    "exchange": [
        "meta-written",
        "meta-renamed",
        "replace-start",
        "replace-exchanged",
        "tracker-written",
        "tracker-renamed",
    ],
    "two-renames": [
        "meta-written",
        "meta-renamed",
        "replace-start",
        "replace-old-moved",
        "replace-renamed",
        "tracker-written",
        "tracker-renamed",
    ],
}
OVERWRITE = {
    "exchange": ["replace-start", "replace-exchanged"],
    "two-renames": ["replace-start", "replace-old-moved", "replace-renamed"],
}


def quiet(*_):
    pass


def use_mode(monkeypatch, mode):
    """Both ways of replacing: renameat2(RENAME_EXCHANGE), and the fallback where it is missing."""
    monkeypatch.setattr(fmt, "USE_RENAME_EXCHANGE", mode == "exchange")


def steps_of(table):
    return [(mode, step) for mode, steps in table.items() for step in steps]


def killed_at(step, fn) -> bool:
    """Run `fn` in a forked child that dies (os._exit, no cleanup) at crash point `step`.
    True when it died there; False when it finished without reaching it."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ[CRASH_ENV] = step
            fn()
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, CRASH_EXIT_CODE), f"child failed (exit {code}) before/at {step}"
    return code == CRASH_EXIT_CODE


def write_iteration(path, iteration, copy, with_meta=True):
    """A fake dist-checkpoint dir: a shard and metadata.json holding `copy`, then megadiff.json."""
    os.makedirs(path)
    with open(os.path.join(path, "__0_0.distcp"), "w") as f:
        f.write(copy)
    with open(os.path.join(path, MCORE_CONFIG_NAME), "w") as f:
        json.dump({"sharded_backend": "torch_dist"}, f)
    if with_meta:
        with open(os.path.join(path, META_NAME), "w") as f:
            json.dump(build_meta(iteration, dict(META, extra={"copy": copy}), 1), f)
    return path


def loaded_copy(ckpt_dir):
    """Which copy `ckpt_dir` holds, checking its shard belongs to its megadiff.json (no mix)."""
    copy = read_meta(ckpt_dir)["extra"]["copy"]
    assert open(os.path.join(ckpt_dir, "__0_0.distcp")).read() == copy
    return copy


def save(root, iteration, copy):
    staging = write_iteration(
        staging_path(os.path.join(root, iteration_dir_name(iteration))), iteration, copy, with_meta=False
    )
    commit_iteration_dir(root, iteration, staging, build_meta(iteration, dict(META, extra={"copy": copy}), 1))


def assert_tidy(root):
    assert not [n for n in os.listdir(root) if fmt.STAGING_MARK in n or fmt.BACKUP_MARK in n], os.listdir(root)


@pytest.mark.parametrize("mode, step", steps_of(RESAVE))
def test_resave_killed_at_any_step_leaves_old_or_new_and_restart_resumes(tmp_path, monkeypatch, mode, step):
    use_mode(monkeypatch, mode)
    root = str(tmp_path / "ckpt")
    save(root, 4, "older")
    save(root, 6, "old")
    assert killed_at(step, lambda: save(root, 6, "new"))
    # Readers find a complete iteration 6 at once, whatever the step (the old copy before the
    # replace took effect, the new one after).
    assert loaded_copy(resolve_checkpoint_dir(root)) in ("old", "new")
    assert loaded_copy(resolve_checkpoint_dir(root, 6)) in ("old", "new")
    # The restart resumes from 6 (never from scratch, never from 4), and cleans up first.
    lock, iteration = claim_save_dir(root, resume=True, log=quiet)
    lock.release()
    assert iteration == 6
    assert_tidy(root)
    assert loaded_copy(os.path.join(root, "iter_0000006")) in ("old", "new")
    assert loaded_copy(os.path.join(root, "iter_0000004")) == "older"
    save(root, 6, "again")  # and the next save works
    assert loaded_copy(resolve_checkpoint_dir(root)) == "again"


@pytest.mark.parametrize("step", NEW_SAVE)
def test_new_save_killed_at_any_step_resumes_from_previous_or_new(tmp_path, step):
    root = str(tmp_path / "ckpt")
    save(root, 2, "prev")
    assert killed_at(step, lambda: save(root, 3, "new"))
    lock, iteration = claim_save_dir(root, resume=True, log=quiet)
    lock.release()
    assert iteration in (2, 3)
    assert iteration == 3 or step in ("meta-written", "meta-renamed", "replace-start")
    assert loaded_copy(resolve_checkpoint_dir(root)) == ("new" if iteration == 3 else "prev")
    assert_tidy(root)


def converted(out_dir, copy):
    """A converter's staging output (an mcore root, as hf_to_mcore writes) holding `copy`."""
    staging = staging_path(out_dir)
    write_iteration(os.path.join(staging, "iter_0000000"), 0, copy)
    with open(os.path.join(staging, TRACKER_NAME), "w") as f:
        f.write("0\n")
    return staging


@pytest.mark.parametrize("mode, step", steps_of(OVERWRITE))
def test_overwrite_killed_at_any_step_keeps_old_or_new_output(tmp_path, monkeypatch, mode, step):
    use_mode(monkeypatch, mode)
    out = str(tmp_path / "out")
    publish(converted(out, "old"), out)
    assert killed_at(step, lambda: publish(converted(out, "new"), out))
    assert loaded_copy(resolve_checkpoint_dir(out)) in ("old", "new")  # readable at once
    check_output_dir(out, overwrite=True, log=quiet, kind="mcore")  # the next conversion restores and cleans
    assert loaded_copy(resolve_checkpoint_dir(out)) in ("old", "new")
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_of_a_real_hf_export_killed_between_renames(tiny_hf, tiny_hf_merged, tmp_path, monkeypatch):
    """moe_convertor --overwrite with the two-rename fallback, killed between its renames: the old
    HF dir is back in place before the next conversion, which then replaces it."""
    from checkpoint_converters.moe import convert_expert_layout

    monkeypatch.setattr(fmt, "USE_RENAME_EXCHANGE", False)
    out = str(tmp_path / "hf")
    convert_expert_layout(tiny_hf, out, "merge", progress=False, log=quiet)
    before = sorted(os.listdir(out))
    assert killed_at(
        "replace-old-moved",
        lambda: convert_expert_layout(tiny_hf_merged, out, "split", overwrite=True, progress=False, log=quiet),
    )
    assert not os.path.exists(out)  # the window the fallback has (no RENAME_EXCHANGE) ...
    notes = []
    clean_stale_leftovers(out, notes.append)  # ... is closed by the next conversion
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["hf"], notes
    assert any("restored" in n for n in notes)
    convert_expert_layout(tiny_hf_merged, out, "split", overwrite=True, progress=False, log=quiet)
    assert "model.safetensors.index.json" in os.listdir(out)


def test_staging_left_by_a_dead_converter_is_removed_a_live_or_unknown_one_kept(tmp_path):
    out = str(tmp_path / "out")
    dead = tmp_path / "out.tmp-0badcafe-999999@host"
    dead_here = f"{out}.tmp-0badcafe-{2**22 + 1}@{fmt._host()}"  # pid above pid_max: not running
    live = staging_path(out)  # this process
    unknown = tmp_path / "out.tmp-deadbeef"  # an older megadiff's name: owner not recorded
    for path in (dead, dead_here, live, unknown):
        os.makedirs(path)
    notes = []
    removed = clean_stale_leftovers(out, notes.append)
    assert removed == [dead_here]
    assert all(os.path.exists(p) for p in (dead, live, unknown))  # other host / alive / unknown
    assert len(notes) == 4 and all("delete it yourself" in n for n in notes[:3])


def test_trainer_restart_puts_back_a_finished_unrenamed_save_and_removes_stale_staging(tmp_path):
    root = str(tmp_path)
    save(root, 5, "five")
    write_iteration(os.path.join(root, "iter_0000005.tmp-aaaa"), 5, "replaced")  # iter 5 exists: stale
    os.makedirs(os.path.join(root, "iter_0000009.tmp-bbbb"))  # incomplete: stale
    open(os.path.join(root, TRACKER_NAME + ".tmp-cccc"), "w").close()  # tracker temp: stale
    write_iteration(os.path.join(root, "iter_0000007.tmp-dddd"), 7, "seven")  # complete, not renamed
    logs = []
    lock, iteration = claim_save_dir(root, resume=True, log=logs.append)
    lock.release()
    assert iteration == 7 and loaded_copy(os.path.join(root, "iter_0000007")) == "seven"
    assert sorted(os.listdir(root)) == [".megadiff.lock", "iter_0000005", "iter_0000007", TRACKER_NAME]
    assert sum("removed" in line for line in logs) == 3 and sum("restored" in line for line in logs) == 1


def test_old_codes_two_rename_crash_resumes_from_a_copy_not_from_scratch(tmp_path):
    """The state the old re-save left when killed between its renames: tracker 6, both copies of
    iteration 6 under `.tmp-` names, no iter_0000006 (the old code then trained from step 1)."""
    root = str(tmp_path)
    write_iteration(os.path.join(root, "iter_0000006.tmp-0a"), 6, "old")
    write_iteration(os.path.join(root, "iter_0000006.tmp-0b"), 6, "new")
    (tmp_path / TRACKER_NAME).write_text("6\n")
    lock, iteration = claim_save_dir(root, resume=True, log=quiet)
    lock.release()
    assert iteration == 6 and loaded_copy(os.path.join(root, "iter_0000006")) in ("old", "new")
    assert_tidy(root)


def test_tracker_naming_a_missing_iteration_stops_the_resume(tmp_path):
    root = str(tmp_path)
    save(root, 4, "four")
    (tmp_path / TRACKER_NAME).write_text("6\n")
    with pytest.raises(CheckpointError, match=r"names iteration 6, but .*iter_0000006 is missing.*iteration 4"):
        claim_save_dir(root, resume=True, log=quiet)
    (tmp_path / TRACKER_NAME).write_text("6\n")
    shutil.rmtree(tmp_path / "iter_0000004")
    with pytest.raises(CheckpointError, match="no complete iteration is left"):
        resume_iteration(root, quiet)


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("corrupt_meta", r"megadiff.json:1: invalid JSON"),
        ("missing_mcore_metadata", r"metadata.json missing"),
    ],
)
def test_damaged_latest_iteration_stops_the_resume_and_is_never_overwritten(tmp_path, damage, problem):
    root = str(tmp_path)
    save(root, 4, "four")
    save(root, 6, "six")
    it6 = os.path.join(root, "iter_0000006")
    if damage == "corrupt_meta":
        open(os.path.join(it6, META_NAME), "w").write("{not json")
    else:
        os.unlink(os.path.join(it6, MCORE_CONFIG_NAME))
    with pytest.raises(
        CheckpointError,
        match=rf"cannot resume from .*iter_0000006 is damaged: .*{problem}.*"
        rf"resume from the newest complete iteration 4.*echo 4 >",
    ):
        resume_iteration(root, quiet)
    # Pruning never deletes it, and a save of that iteration moves it aside instead of over it.
    prune_checkpoints(root, keep_last=1)
    assert os.path.isdir(it6) and os.path.isdir(os.path.join(root, "iter_0000004"))
    with pytest.warns(UserWarning, match="damaged"):
        save(root, 6, "resaved")
    kept = [n for n in os.listdir(root) if n.startswith("iter_0000006" + fmt.DAMAGED_MARK)]
    assert len(kept) == 1 and open(os.path.join(root, kept[0], "__0_0.distcp")).read() == "six"


def test_unfinished_newer_iteration_is_reported_and_resume_uses_the_tracker(tmp_path):
    root = str(tmp_path)
    save(root, 3, "three")
    write_iteration(os.path.join(root, "iter_0000008"), 8, "x", with_meta=False)  # no megadiff.json
    logs = []
    assert resume_iteration(root, logs.append) == 3
    assert any("iter_0000008 is not a complete checkpoint" in line for line in logs)


def test_resume_false_refuses_a_save_dir_that_holds_checkpoints(tmp_path):
    save(str(tmp_path), 2, "two")
    with pytest.raises(CheckpointError, match=r"latest iteration 2\) and checkpoint.resume=false"):
        claim_save_dir(str(tmp_path), resume=False, log=quiet)


def test_eight_digit_iteration_is_found_by_every_reader(tmp_path):
    """Iteration 10_000_000 is `iter_10000000` (8 digits): the converters' and the trainer's readers
    all find it, as Megatron-LM's `iter_{:07d}` names it, and sort it after iteration 9_999_999."""
    root = str(tmp_path)
    assert iteration_dir_name(10_000_000) == "iter_10000000"
    save(root, 9_999_999, "older")
    save(root, 10_000_000, "newest")
    newest = os.path.join(root, "iter_10000000")
    assert sorted(iteration_dirs(root)) == complete_iterations(root) == [9_999_999, 10_000_000]
    assert latest_iteration(root) == 10_000_000
    assert resolve_checkpoint_dir(root) == resolve_checkpoint_dir(newest) == newest
    assert resolve_checkpoint_dir(root, 10_000_000) == newest
    assert resume_iteration(root, quiet) == 10_000_000
    assert is_mcore_checkpoint(root) and is_mcore_checkpoint(newest)
    # The trainer's restart: a finished, unrenamed 8-digit save is put back, a stale copy removed.
    write_iteration(os.path.join(root, "iter_10000001.tmp-aaaa"), 10_000_001, "finished")
    os.makedirs(os.path.join(root, "iter_10000000.tmp-bbbb"))
    lock, iteration = claim_save_dir(root, resume=True, log=quiet)
    lock.release()
    assert iteration == 10_000_001 and loaded_copy(os.path.join(root, "iter_10000001")) == "finished"
    assert_tidy(root)
    prune_checkpoints(root, keep_last=2)
    assert sorted(iteration_dirs(root)) == [10_000_000, 10_000_001]
