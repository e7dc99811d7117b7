"""Process groups: torch.distributed start-up and megatron-core model-parallel groups."""

import datetime
import os

import torch

from megadiff.platform.child_processes import make_children_die_with_parent
from megadiff.platform.cpu import enable_cpu_support
from megadiff.platform.device import distributed_backend, run_device, uses_cuda
from megadiff.platform.parallel_layout import ParallelLayout


def on_gpu() -> bool:
    """True when the run device is CUDA (platform.device.uses_cuda)."""
    return uses_cuda()


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's env (or as a 1-process group) on the run device
    (platform.device): nccl on cuda:LOCAL_RANK, gloo on the CPU. On the CPU this also switches
    on megadiff.platform.cpu so megatron-core runs there. Child processes (dist_checkpointing's
    writers) die with this process from here on."""
    make_children_die_with_parent()
    if not uses_cuda():
        enable_cpu_support()
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = distributed_backend()
    if backend == "nccl":
        torch.cuda.set_device(run_device())
    torch.distributed.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """(Re)build megatron-core's TP/EP/ETP/PP/VPP groups for `layout` and seed its RNG tracker.

    Safe to call repeatedly in one process: tests run several layouts in one torchrun launch."""
    # megatron-core (about 1 s) only where groups are built: tools use print_rank0 without it
    from megatron.core import parallel_state, tensor_parallel

    world = torch.distributed.get_world_size()
    model_parallel = layout.tp * layout.pp
    if world % model_parallel or (world // layout.pp) % (layout.ep * layout.etp):
        raise ValueError(f"world size {world} does not fit layout {layout}: need tp*pp | world and ep*etp | world/pp")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def is_rank0() -> bool:
    """Rank 0 of the process group, or before it exists, of torchrun's RANK (every rank runs the
    same start-up, which rank 0 alone should report)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def print_rank0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)
