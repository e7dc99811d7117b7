"""tools/gpu_check.py (`make gpu-check`) imports on any machine and refuses cleanly without CUDA,
before it writes anything. Its GPU run is exercised on a GPU node (README, 'GPU check')."""

import importlib.util
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


def test_gpu_check_imports_and_parses_its_defaults():
    args = _import_tool().parse_args([])
    assert args.output == "gpu_check_out" and args.steps == 20 and not args.skip_tests
    assert args.budget_s == 480  # the 8 minutes on one GPU


def test_a_command_still_running_at_the_end_of_the_budget_is_killed_with_its_children(tmp_path):
    tool = _import_tool()
    tool.DEADLINE[0] = time.monotonic() + 1.0
    start = time.monotonic()
    # the shell's child `sleep` holds stdout open: only killing the process group ends the read
    result = tool.run(["bash", "-c", "echo started; sleep 60; echo never"], str(tmp_path / "log"))
    assert time.monotonic() - start < 20
    assert result["timed_out"] and result["rc"] != 0
    assert (tmp_path / "log").read_text().splitlines()[1:] == ["started"]
    assert tool.run(["true"], str(tmp_path / "log"))["timed_out"]  # nothing starts after the deadline


def test_gpu_check_refuses_without_cuda_with_exit_2_and_a_clear_message(tmp_path):
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
    assert "gpu_check: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
    assert "run it on a GPU node" in proc.stderr
    assert not out.exists()  # nothing half-written


def test_gpu_check_refuses_without_megatron_core_naming_the_wheels(monkeypatch, capsys):
    tool = _import_tool()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # `import megatron.core` raises ImportError
    with pytest.raises(SystemExit) as refused:
        tool.refuse_without_cuda()
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "megatron-core is not importable" in err and "make gpu-wheels" in err
