"""Launch a torchrun worker from a test and return its output; failures show the log tail.

Workers run on the CPU with gloo in fp32 unless a test asks for the GPU (`gpu=True`, tests/gpu):
on a GPU node they would otherwise pick NCCL and `cuda:LOCAL_RANK`, so 2- and 4-process layout
tests would need as many GPUs, and `dtype: auto` would become bf16, which fp32 tolerances fail.

torchrun is `python -m torch.distributed.run` of the running interpreter (no `torchrun` script
need sit beside it). A watchdog ends a launch that outlives its timeout, workers included (their
own process group): the test fails naming the timeout instead of hanging. MEGADIFF_TEST_TIMEOUT_S
caps every launch's timeout (`make gpu-check` sets it, so a hung test costs a lent GPU little).
"""

import os
import subprocess
import sys

from megadiff.platform.child_processes import kill_process_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_ENV = "MEGADIFF_TEST_TIMEOUT_S"


def worker_env(gpu: bool = False, base=None) -> dict:
    """The environment of torchrun and its workers: CUDA hidden (no visible device, and the run
    device pinned to the CPU) unless `gpu`."""
    env = dict(os.environ if base is None else base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if gpu:
        env.pop("MEGADIFF_DEVICE", None)  # the run device follows CUDA: cuda:LOCAL_RANK, NCCL
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # torch.cuda.is_available() is False in the workers
        env["MEGADIFF_DEVICE"] = "cpu"
    return env


def launch_timeout(timeout: float) -> float:
    """`timeout`, capped by MEGADIFF_TEST_TIMEOUT_S when that is set."""
    cap = os.environ.get(TIMEOUT_ENV)
    return min(timeout, float(cap)) if cap else timeout


def torchrun_command(nproc: int, script: str, args, master_port: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(master_port or _free_port()),
        script,
        *[str(a) for a in args],
    ]


def run_watched(cmd: list[str], timeout: float, env: dict) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `cmd` run from the repo root; at `timeout` seconds the
    command and every process it started are killed and AssertionError names the timeout."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)  # torchrun and its workers (each in a session of its own)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd)} was killed after {timeout:.0f} s (watchdog; {TIMEOUT_ENV} caps it):\n"
            f"{(stdout + stderr)[-6000:]}"
        ) from None
    return proc.returncode, stdout + stderr


def run_torchrun(nproc: int, script: str, args, timeout: int = 600, gpu: bool = False) -> str:
    cmd = torchrun_command(nproc, script, args)
    rc, output = run_watched(cmd, launch_timeout(timeout), worker_env(gpu))
    if rc != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {rc}:\n{output[-6000:]}")
    return output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
