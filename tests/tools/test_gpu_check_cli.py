"""tools/gpu_check.py (`make gpu-check`) imports on any machine and refuses cleanly without CUDA,
before it writes anything. Its GPU run is exercised on a GPU node (README, 'GPU check')."""

import importlib.util
import os
import subprocess
import sys

from tests.dist.launch import REPO, worker_env

TOOL = os.path.join(REPO, "tools", "gpu_check.py")


def test_gpu_check_imports_and_parses_its_defaults():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args([])
    assert args.output == "gpu_check_out" and args.steps == 20 and not args.skip_tests


def test_gpu_check_refuses_without_cuda_with_exit_2_and_a_clear_message(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, TOOL, "--output", str(out)], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: torch" in proc.stderr and "sees no CUDA device" in proc.stderr
    assert "run it on a GPU node" in proc.stderr
    assert not out.exists()  # nothing half-written
