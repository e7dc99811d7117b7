"""benchmarks/gpu_step.py's CPU mode (--tiny) runs end to end: the local-spec variant trains a
step and reports tokens/s and TFLOP/s against the reference model; TE variants say why they are
skipped. GPU numbers are not checked here."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.repeat  # stack-independent; CI's light stack (b) skips it to stay in budget
@pytest.mark.slow
def test_gpu_step_tiny_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MEGADIFF_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_step.py", "--tiny", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    local = results["variants"]["local/fp32/dense"]
    assert local["tokens_per_s"] > 0 and local["tflops_per_gpu"] > 0 and local["vs_reference"] > 0
    assert local["experts"] == ["TorchGroupedMLP"]  # perf.moe_experts=auto on the CPU: torch._grouped_mm runs
    assert local["mfu"] is None and local["peak_memory_gib"] is None  # no peak / CUDA memory on the CPU
    assert results["reference"]["tokens_per_s"] > 0
    assert "skipped" in results["variants"]["te/fp8/dense"]
