"""Launch a torchrun worker from a test and return its output; failures show the log tail.

Workers run on the CPU with gloo in fp32 unless a test asks for the GPU (`gpu=True`, tests/gpu):
on a GPU node they would otherwise pick NCCL and `cuda:LOCAL_RANK`, so 2- and 4-process layout
tests would need as many GPUs, and `dtype: auto` would become bf16, which fp32 tolerances fail.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def run_torchrun(nproc: int, script: str, args, timeout: int = 600, gpu: bool = False) -> str:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        script,
        *[str(a) for a in args],
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(gpu), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}")
    return output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
