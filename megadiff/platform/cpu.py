"""Let unmodified megatron-core run on CPU with gloo.

With compat.py (the version-dependent workarounds, the megatron-core import hook among them) this
is the only module in megadiff that patches anything. `enable_cpu_support()` is called by
`init_distributed()` when the run device is the CPU (no CUDA, or `MEGADIFF_DEVICE=cpu`) and
never when it is CUDA, so GPU runs use megatron-core untouched. What is redirected, and why:

- `torch.cuda.current_device/Stream/Event/stream/synchronize/...`: megatron-core calls them
  unconditionally; on CPU they become the run device (platform.device) / no-ops.
- CUDA RNG state (`tensor_parallel.random`): the tracker forks CPU generator states instead
  (compat.use_cpu_rng_in_tracker).
- A TorchFunctionMode maps every CUDA device argument (`device="cuda"`, `device=0`,
  `.cuda()`, `.to("cuda")`, `pin_memory`) to CPU, which catches the hard-coded CUDA tensors in
  schedules, optimizer, DDP buffers and checkpointing in one place. It also reports CPU tensors'
  `type()` as the `torch.cuda.*Tensor` names the (distributed) optimizer insists on.
- `moe_utils.te_general_gemm` is referenced but undefined without Transformer Engine (0.16.1;
  compat.define_te_general_gemm_without_te, which model building also calls on CUDA).
- gloo's `all_to_all_single` needs split sizes as lists, the alltoall dispatcher passes tensors.
- gloo's `all_gather` / `reduce_scatter` take only equal-sized pieces; under expert parallelism
  with expert-TP > 1 the alltoall dispatcher gathers (and, in backward, reduce-scatters) a different
  number of tokens per expert-TP rank. Uneven calls are padded to the largest piece and sliced.
"""

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

from megadiff.platform import compat
from megadiff.platform import device as _device

_ENABLED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA placements to CPU for every torch function and tensor method call."""

    _TENSOR_NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return self._TENSOR_NAMES.get(name, name)
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU (everything is synchronous there)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # wait_stream, record_event, synchronize, ...
        return lambda *args, **kwargs: _NullStream()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda():
    cuda = torch.cuda
    # A device, not an index: it is used as `device=` also inside autograd backward, where the
    # TorchFunctionMode below is not active.
    # cpu, or device_audit's pretend cpu:0 (read on every call: megatron-core calls this a lot)
    cuda.current_device = lambda: _device._audit_device or _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it; CPU is already seeded
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_all_to_all():
    dist = torch.distributed
    original = dist.all_to_all_single

    def as_list(sizes):
        if sizes is None or isinstance(sizes, list):
            return sizes
        return [int(s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), **kw)

    dist.all_to_all_single = all_to_all_single


def _patch_uneven_gather_and_scatter():
    dist = torch.distributed
    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def padded(t: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t

    @functools.wraps(all_gather)
    def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        pieces = [tensor.new_empty(rows, *tensor.shape[1:]) for _ in tensor_list]
        all_gather(pieces, padded(tensor.contiguous(), rows), group=group)
        for out, piece in zip(tensor_list, pieces, strict=True):
            out.copy_(piece[: out.shape[0]])
        return None

    @functools.wraps(reduce_scatter)
    def uneven_reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op or all(t.shape == output.shape for t in input_list):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in input_list)
        stacked = torch.stack([padded(t, rows) for t in input_list])  # every rank's piece, summed everywhere
        dist.all_reduce(stacked, op=op, group=group)
        output.copy_(stacked[dist.get_rank(group)][: output.shape[0]])
        return None

    dist.all_gather, dist.reduce_scatter = uneven_all_gather, uneven_reduce_scatter


def enable_cpu_support() -> None:
    """Idempotent. Refuses to run where CUDA is the run device: GPU runs keep megatron-core untouched."""
    global _ENABLED
    if _ENABLED:
        return
    if _device.uses_cuda():
        raise RuntimeError(
            "enable_cpu_support() must not be used when CUDA is the run device "
            f"(set {_device.DEVICE_ENV}=cpu to run on the CPU of a GPU node)"
        )
    _patch_torch_cuda()
    compat.use_cpu_rng_in_tracker()
    compat.define_te_general_gemm_without_te()
    _patch_all_to_all()
    _patch_uneven_gather_and_scatter()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _ENABLED = True


def cpu_support_enabled() -> bool:
    return _ENABLED
