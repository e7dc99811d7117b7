"""What a run prints: in a log file each step line says `step i/N`, the elapsed time and the ETA;
third-party warnings appear once, from rank 0, on one line; the demo's filter leaves no fragment
of a warning behind."""

import io
import subprocess
import sys
import textwrap

from megadiff.training.config import load_config
from megadiff.training.logging import MetricsLogger
from megadiff.training.loop import StepResult
from tools.demo import without_warnings


def test_log_file_lines_carry_step_of_total_elapsed_and_eta():
    cfg = load_config(None, ["model.hf_dir=m", "data.train_files=d", "logging.log_interval=2"])
    now = [100.0]
    stream = io.StringIO()  # not a terminal: plain lines, no bar
    logger = MetricsLogger(cfg, total_steps=10, initial_step=4, stream=stream, clock=lambda: now[0])
    for step in (5, 6, 7, 8):
        now[0] += 2.0  # every step takes 2 s
        logger.log(StepResult(step, 1.0, 1e-3, 0.5, 100, False), seconds=2.0)
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss ")[0] for line in lines] == ["step 6/10", "step 8/10"]
    # resumed at step 4: 2 steps in 4 s, 4 to go -> 8 s; then 4 steps in 8 s, 2 to go -> 4 s
    assert lines[0].endswith(" elapsed 0:00:04 ETA 0:00:08") and lines[1].endswith(" elapsed 0:00:08 ETA 0:00:04")


RAISE_WARNINGS = textwrap.dedent(
    """
    import sys, warnings
    from megadiff.platform.rank_output import warnings_from_rank0_only
    warnings_from_rank0_only(int(sys.argv[1]))
    def library_a(): warnings.warn("Apex is not installed.\\n  Falling back to Torch Norm")
    def library_b(): warnings.warn("Apex is not installed.\\n  Falling back to Torch Norm")
    library_a(); library_b(); library_a()
    warnings.warn("deprecated", DeprecationWarning, stacklevel=2)  # hidden, as Python's defaults do
    warnings.warn("old API", FutureWarning)
    """
)


def run_rank(rank: int) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}  # no PYTHONWARNINGS: the process's own filters
    proc = subprocess.run([sys.executable, "-c", RAISE_WARNINGS, str(rank)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_third_party_warnings_appear_once_from_rank0_on_one_line_each():
    lines = run_rank(0).splitlines()
    assert len(lines) == 2, lines  # the same message from two places: once; the future warning once
    assert lines[0].endswith(": UserWarning: Apex is not installed. Falling back to Torch Norm")
    assert lines[1].endswith(": FutureWarning: old API")
    assert run_rank(1) == ""


def test_demo_output_filter_leaves_no_warning_fragments():
    output = [
        "+ tools/convert_mcore_to_hf.py --mcore-dir ckpt\n",
        "/venv/torch/distributed/checkpoint/x.py:12: FutureWarning: `load_state_dict` is deprecated\n",
        "  checkpoint.load_state_dict(\n",
        "/venv/torch/distributed/c10d_logger.py:83: FutureWarning: `all_gather_into_tensor` is deprecated.\n",
        "  return func(*args, **kwargs)\n",
        "/venv/megatron/core/models/backends.py:21: UserWarning: Apex is not installed. (one-line form)\n",
        "step 1/6 loss 6.3974 lr 3.00e-03\n",
        "  indented output of a tool, not under a warning\n",
    ]
    assert list(without_warnings(output)) == [output[0], output[6], output[7]]
