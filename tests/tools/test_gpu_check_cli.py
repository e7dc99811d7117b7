"""tools/gpu_check.py (`make gpu-check`) on a machine without a GPU: it refuses cleanly without
torch, CUDA or megatron-core (one line, exit 2, nothing written), and its machinery is exercised
with fakes: per-phase budgets that kill a command and everything it started (also processes in
sessions of their own, as torchrun's workers are), gpu_check.json rewritten after every phase, the
loss-went-down rule of the end to end, the nvidia-smi utilisation sampler, and `make gpu-check`
choosing the venv's python. The GPU run itself is exercised only on a GPU node (README, 'GPU check')."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.dist.launch import REPO, worker_env

TOOL = os.path.join(REPO, "tools", "gpu_check.py")


def _import_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: dead, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_gpu_check_parses_its_defaults_phase_budgets_within_8_minutes():
    tool = _import_tool()
    args = tool.parse_args([])
    assert args.output == "gpu_check_out" and args.steps == 20 and not args.skip_tests and not args.no_benchmark
    assert args.budget_s == 480  # the 8 minutes on one GPU
    phases = (args.tests_budget_s, args.end_to_end_budget_s, args.benchmark_budget_s)
    assert all(b > 0 for b in phases) and sum(phases) + tool.ENVIRONMENT_BUDGET_S <= args.budget_s
    assert args.test_timeout_s < args.tests_budget_s
    command = tool.benchmark_command("x.json")
    assert "--no-reference" in command and command[command.index("--moe-experts") + 1 :][:2] == [
        "grouped",
        "sequential",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees are read from /proc")
def test_a_command_at_the_end_of_its_budget_is_killed_with_every_process_it_started(tmp_path):
    tool = _import_tool()
    tool.DEADLINE[0] = time.monotonic() + 1.5
    start = time.monotonic()
    # `setsid` puts the grandchild in a session of its own, as torchrun does with its workers:
    # killing the command's process group would leave it running
    script = "setsid sleep 60 & echo $!; sleep 60; echo never"
    result = tool.run(["bash", "-c", script], str(tmp_path / "log"))
    assert time.monotonic() - start < 20
    assert result["timed_out"] and result["rc"] != 0
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 2 and "never" not in lines
    assert _gone(int(lines[1]))  # the grandchild in its own session is gone too
    assert tool.run(["true"], str(tmp_path / "log"))["timed_out"]  # nothing starts after the deadline


def test_phases_have_their_own_budgets_and_the_report_is_rewritten_after_each(tmp_path, monkeypatch):
    """A hung test phase is cut at its budget; the end to end and the benchmark still run with
    theirs; gpu_check.json holds every finished phase at every point."""
    tool = _import_tool()
    snapshots = []
    real_write = tool.write_report

    def write(out_dir, report):
        path = real_write(out_dir, report)
        snapshots.append(json.loads(open(path).read()))
        return path

    def hung_tests(out_dir, work, timeout):
        result = tool.run(["sleep", "60"], os.path.join(out_dir, "pytest.log"))
        return {**result, "ok": False}

    def end_to_end(out_dir, work, steps):
        assert tool.DEADLINE[0] - time.monotonic() > 5  # its own budget, not what the tests left
        return {"ok": True, "steps": steps}

    monkeypatch.setattr(tool, "refuse_without_cuda", lambda: None)
    monkeypatch.setattr(tool, "environment_report", lambda: {"gpu": "fake"})
    monkeypatch.setattr(tool, "write_report", write)
    monkeypatch.setattr(tool, "run_gpu_tests", hung_tests)
    monkeypatch.setattr(tool, "run_end_to_end", end_to_end)
    monkeypatch.setattr(tool, "run_benchmark", lambda out_dir, work: {"ok": True, "summary": {}})
    start = time.monotonic()
    rc = tool.main(["--output", str(tmp_path / "out"), "--tests-budget-s", "1", "--end-to-end-budget-s", "30"])
    assert time.monotonic() - start < 20
    assert rc == 1  # the tests failed
    assert [s["phases_done"] for s in snapshots] == [
        ["environment"],
        ["environment", "tests"],
        ["environment", "tests", "end_to_end"],
        ["environment", "tests", "end_to_end", "benchmark"],
        ["environment", "tests", "end_to_end", "benchmark"],  # the final verdict
    ]
    assert [s["ok"] for s in snapshots] == [None, None, None, None, False]
    tests = snapshots[1]["tests"]
    assert tests["timed_out"] and tests["budget_s"] == 1 and tests["seconds"] < 10
    assert snapshots[-1]["end_to_end"]["ok"] and snapshots[-1]["benchmark"]["ok"]
    assert not (tmp_path / "out" / "gpu_check.json.tmp").exists()


def test_the_end_to_end_passes_only_when_the_loss_went_down():
    tool = _import_tool()
    noisy_down = [6.3, 6.6, 6.0, 6.2, 5.5, 5.9, 5.1, 5.6, 4.8, 5.2, 4.9, 4.4, 4.7, 4.0, 4.5, 3.9, 4.2, 3.6, 4.1, 3.5]
    assert tool.loss_went_down(noisy_down)["ok"]
    assert not tool.loss_went_down(noisy_down[::-1])["ok"]
    assert not tool.loss_went_down([5.0] * 20)["ok"]  # flat is not down
    assert not tool.loss_went_down([6.0, 1.0])["ok"]  # too few steps to tell
    assert not tool.loss_went_down([])["ok"]


def test_utilisation_sampler_reads_nvidia_smi_and_slices_windows(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in *"--query-gpu=utilization.gpu"*"-lms"*) ;; *) exit 3 ;; esac\n'
        "i=0; while true; do echo $(( 40 + i % 3 )); i=$((i + 1)); sleep 0.02; done\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    tool = _import_tool()
    with tool.UtilisationSampler(interval_ms=20) as sampler:
        time.sleep(0.5)
        middle = time.time()
        time.sleep(0.5)
    assert len(sampler.samples) > 10 and {v for _, v in sampler.samples} <= {40.0, 41.0, 42.0}
    late = sampler.between(middle, time.time())
    assert late and 0 < late["samples"] < len(sampler.samples) and 40 <= late["mean"] <= 42
    assert sampler.between(0, 1) is None  # no samples in that window
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with tool.UtilisationSampler() as sampler:  # no nvidia-smi: no samples, no error
        pass
    assert sampler.samples == []


def test_benchmark_summary_gives_the_sequential_over_grouped_step_time():
    tool = _import_tool()
    results = {"variants": {
        "local/bf16/dense/grouped": {"step_s": 0.5, "mfu": 0.2, "gpu_utilisation_pct": {"mean": 95.0}},
        "local/bf16/dense/sequential": {"step_s": 2.0, "mfu": 0.05, "gpu_utilisation_pct": {"mean": 40.0}},
        "te/bf16/dense/grouped": {"skipped": "Transformer Engine not usable here"},
    }}  # fmt: skip
    summary = tool.benchmark_summary(results)
    assert summary["sequential_over_grouped_step_time"] == 4.0
    assert summary["local/bf16/dense/sequential"]["gpu_util_mean"] == 40.0


def test_gpu_check_refuses_without_cuda_with_exit_2_and_one_line(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, TOOL, "--output", str(out)],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert "gpu_check: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
    assert "run it on a GPU node" in proc.stderr
    assert not out.exists()  # nothing half-written


def test_gpu_check_refuses_without_torch_with_exit_2_and_one_line(tmp_path):
    out = tmp_path / "report"
    # -S: no site-packages, so no torch (as a bare system python3 on a GPU node)
    proc = subprocess.run(
        [sys.executable, "-S", TOOL, "--output", str(out)],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
    assert "has no torch" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_gpu_check_refuses_without_megatron_core_naming_the_wheels(monkeypatch, capsys):
    tool = _import_tool()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # `import megatron.core` raises ImportError
    with pytest.raises(SystemExit) as refused:
        tool.refuse_without_cuda()
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "megatron-core is not importable" in err and "make gpu-wheels" in err


def test_make_gpu_check_uses_the_venv_python_when_there_is_one(tmp_path):
    def command(*make_args):
        proc = subprocess.run(
            ["make", "-s", "-n", "gpu-check", *make_args], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert command(f"VENV={venv}").startswith(f"{venv}/bin/python tools/gpu_check.py")
    assert command(f"VENV={tmp_path / 'none'}", "PYTHON=python3").startswith("python3 tools/gpu_check.py")
