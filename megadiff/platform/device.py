"""The one device a megadiff process computes on, decided here and nowhere else.

- `cuda:LOCAL_RANK` when CUDA is usable (torch.distributed then uses NCCL), else `cpu` (gloo).
- `MEGADIFF_DEVICE=cpu` pins a process to the CPU on a GPU node (the tests' fp32 CPU checks do
  that; CUDA then stays untouched); `MEGADIFF_DEVICE=cuda` insists on CUDA.
- Under an initialised process group the backend decides: NCCL means CUDA, gloo means CPU.

Everything the trainer, the loss, the sampler and the tools create (batches, masks, loss
denominators, token counts, tensors handed to collectives) goes to `run_device()`; the data side
builds on the CPU and moves once per micro-batch (`to_run_device`).
"""

import os

import torch
from torch.nn.attention.flex_attention import BlockMask

DEVICE_ENV = "MEGADIFF_DEVICE"
_audit_device: torch.device | None = None  # set only by platform.device_audit


def _pinned() -> str:
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if value not in ("", "auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={value!r}: use cpu, cuda or auto (unset)")
    return value


def uses_cuda() -> bool:
    """True when this process computes on CUDA (and its process group is NCCL)."""
    if _audit_device is not None:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_backend() == "nccl"
    pinned = _pinned()
    if pinned == "cpu":
        return False
    if pinned == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch sees no CUDA device (torch {torch.__version__})")
    return torch.cuda.is_available()


def run_device() -> torch.device:
    """cuda:LOCAL_RANK on a GPU run, cpu otherwise (see the module docstring)."""
    if _audit_device is not None:
        return _audit_device
    if uses_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def synchronize() -> None:
    """Wait for the work queued on the run device (CUDA); on the CPU there is nothing to wait for."""
    if uses_cuda():
        torch.cuda.synchronize()


def distributed_backend() -> str:
    return "nccl" if uses_cuda() else "gloo"


def default_params_dtype() -> torch.dtype:
    """`dtype: auto`: bf16 where the run device is CUDA (as LLaDA2 ships), fp32 on CPU."""
    return torch.bfloat16 if uses_cuda() else torch.float32


def to_run_device(value):
    """`value` with every tensor (also inside dicts, lists, tuples and BlockMasks) on the run device.

    Host tensors are copied with non_blocking=True: a blocking copy to CUDA synchronises the
    stream afterwards, so the host would wait for every kernel queued before it (the previous
    step's optimizer, at the start of a step). From pageable memory the copy is staged before the
    call returns, so the host tensor may be reused at once."""
    device = run_device()
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, BlockMask):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_run_device(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_run_device(v) for v in value)
    return value
