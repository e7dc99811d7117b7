"""Checkpoint/resume: a run killed with SIGKILL resumes bit-exactly; SIGTERM saves and exits 0;
an interrupted save is never picked as the latest checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.dist.launch import REPO, _free_port, run_torchrun, worker_env

LAYOUT = ["parallel.ep=2"]  # 2 processes: expert + dense optimizers (chained), DP=2 for dense


def losses(path):
    return [json.loads(line)["loss"] for line in open(path).read().splitlines()]


def start_training(nproc, args):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = worker_env()  # CPU, gloo, fp32 also on a GPU node
    return subprocess.Popen(
        [torchrun, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "tools/train.py", *map(str, args)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def signal_all(proc, sig, include_torchrun=True):
    """Signal torchrun's workers, and torchrun itself (it starts each worker in its own session)."""
    import psutil

    targets = psutil.Process(proc.pid).children(recursive=True)[::-1]
    if include_torchrun:
        targets.append(psutil.Process(proc.pid))
    for p in targets:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(proc, metrics, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics) and any(json.loads(l)["step"] >= step for l in open(metrics).read().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.dist
@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(tiny_run_dir, tmp_path):
    cfg = tiny_run_dir / "cfg.yaml"
    # A constant LR makes the schedule independent of train.steps, so the killed run can be
    # long (it must still be running when it is killed) and still match the 6-step run.
    common = [cfg, *LAYOUT, "train.lr_schedule=constant"]
    straight = tmp_path / "straight.jsonl"
    run_torchrun(2, "tools/train.py", [*common, "train.steps=6", f"logging.metrics_file={straight}"])

    ckpt, first = tmp_path / "ckpt", tmp_path / "first.jsonl"
    proc = start_training(2, [*common, "train.steps=1000", f"checkpoint.save_dir={ckpt}",
                              "checkpoint.save_interval=3", f"logging.metrics_file={first}"])
    try:
        wait_for_step(proc, first, 4)  # the step-3 checkpoint is complete before step 4 runs
    finally:
        signal_all(proc, signal.SIGKILL)
        proc.wait()
    assert open(ckpt / "latest_checkpointed_iteration.txt").read().strip() == "3"
    # Leftovers of interrupted saves of later steps must not be picked up.
    (ckpt / "iter_0000009.tmp-deadbeef").mkdir()
    (ckpt / "iter_0000008").mkdir()
    (ckpt / "iter_0000008" / "metadata.json").write_text("{}")

    resumed = tmp_path / "resumed.jsonl"
    out = run_torchrun(2, "tools/train.py", [*common, "train.steps=6", f"checkpoint.save_dir={ckpt}",
                                             "checkpoint.save_interval=3", f"logging.metrics_file={resumed}"])
    assert "resumed from" in out and "at step 3\n" in out, out[-3000:]
    assert losses(first)[:3] == losses(straight)[:3]
    assert losses(resumed) == losses(straight)[3:], (losses(resumed), losses(straight))


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tiny_run_dir, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = start_training(1, [tiny_run_dir / "cfg.yaml", "train.steps=500", f"checkpoint.save_dir={ckpt}",
                              f"logging.metrics_file={metrics}"])
    wait_for_step(proc, metrics, 2)
    # The workers get the SIGTERM (torchrun forwards one it receives too, but then reports the
    # job as failed itself whatever the workers do).
    signal_all(proc, signal.SIGTERM, include_torchrun=False)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-4000:]
    assert "SIGTERM at step" in output
    step = int(open(ckpt / "latest_checkpointed_iteration.txt").read())
    assert 2 <= step < 500 and (ckpt / f"iter_{step:07d}" / "megadiff.json").is_file()
