"""Catch, on a CPU-only machine, tensors that would be on the wrong device on a GPU run.

A CPU has one real device, so a tensor left on the host looks exactly like one moved to the run
device, and the first GPU run is the first to notice. `DeviceAudit` gives the CPU a second,
pretend device with real numerics: while it is active, `run_device()` is `cpu:0` (a valid CPU
device that torch reports as `cpu`) and every tensor carries a flag saying whether it is "on the
run device". A tensor is on the run device when it was

- created with `device=` the run device (or a CUDA device: megatron-core's `device="cuda"`,
  `torch.cuda.current_device()`), or moved there with `.to(...)` / `.cuda()`;
- computed from a tensor that is (ops propagate the flag); or
- a parameter or buffer of a module handed to `place()` (the model lives on the run device).

Reading `.device` of a flagged tensor gives `cpu:0`, so `torch.arange(n, device=x.device)` follows
`x`. A violation is recorded where CUDA would refuse the same thing:

- an op mixes a flagged tensor with an unflagged one of more than 0 dims (CUDA accepts 0-dim CPU
  tensors as scalars; `copy_` and `.to` move data on purpose; indexing accepts CPU indices);
- a torch.distributed collective gets an unflagged tensor (NCCL takes CUDA tensors only).

Ops inside a torch function call (autograd backward, C++ kernels) are not seen; the boundaries
that matter (model inputs, loss inputs, collectives) are. For tests only.
"""

import functools
import traceback

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from megadiff.platform import device as _device
from megadiff.platform.cpu import cpu_support_enabled

AUDIT_DEVICE = torch.device("cpu", 0)
_FLAG = "_megadiff_on_run_device"
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "all_to_all",
    "_all_gather_base",
    "_reduce_scatter_base",
)
_MOVES = (torch.Tensor.copy_,)


def _is_accessor(func, kind: str, attribute: str) -> bool:
    """`func` is the `__get__`/`__set__` of a tensor attribute (a fresh method-wrapper each time)."""
    descriptor = getattr(func, "__self__", None)
    return (
        getattr(func, "__name__", None) == kind
        and getattr(descriptor, "__name__", None) == attribute
        and getattr(descriptor, "__objclass__", None) is torch._C.TensorBase
    )


def on_run_device(t: torch.Tensor) -> bool:
    return bool(getattr(t, _FLAG, False))


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nest of args, BlockMasks' tensors included."""
    found = []
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif isinstance(leaf, BlockMask):
            found += [t for t in leaf.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
    return found


def _flag(value, on: bool) -> None:
    for t in _tensors(value):
        setattr(t, _FLAG, on)


def _is_run_device(spec) -> bool:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return True  # CUDA ordinal
    if isinstance(spec, str):
        spec = torch.device(spec)
    return isinstance(spec, torch.device) and (spec.type == "cuda" or spec == AUDIT_DEVICE)


def _is_device_spec(x) -> bool:
    return isinstance(x, torch.device) or (isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda"))


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "device_audit" not in f.filename]
    return "; ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:])


class DeviceAudit(TorchFunctionMode):
    """`with DeviceAudit() as audit: ...`, then `audit.violations` (a list of strings)."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self._saved = {}

    # ---- set-up --------------------------------------------------------------------------------

    def place(self, *modules) -> None:
        """Declare modules' parameters and buffers to be on the run device."""
        for module in modules:
            # Module.buffers(m): megatron-core DDP shadows `buffers` with its grad buffers
            for t in list(torch.nn.Module.parameters(module)) + list(torch.nn.Module.buffers(module)):
                setattr(t, _FLAG, True)

    def __enter__(self):
        if not cpu_support_enabled():  # its CUDA->CPU mode must sit below this one, for good
            raise RuntimeError("DeviceAudit runs on the CPU platform: call init_distributed() first")
        _device._audit_device = AUDIT_DEVICE
        dist = torch.distributed
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._checked_collective(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        _device._audit_device = None
        for name, original in self._saved.items():
            setattr(torch.distributed, name, original)
        return super().__exit__(*exc)

    def _record(self, what: str) -> None:
        self.violations.append(f"{what} at {_where()}")

    def _checked_collective(self, name, original):
        @functools.wraps(original)
        def collective(*args, **kwargs):
            tensors = _tensors((args, kwargs))
            host = [tuple(t.shape) for t in tensors if not on_run_device(t)]
            if host:
                self._record(f"torch.distributed.{name} got host tensors of shapes {host}")
            return original(*args, **kwargs)

        return collective

    # ---- every torch call ----------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_accessor(func, "__get__", "device"):
            return AUDIT_DEVICE if on_run_device(args[0]) else torch.device("cpu")
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if _is_accessor(
            func, "__set__", "data"
        ):  # `param.data = buffer_view` (DDP): the tensor now lives where value does
            func(*args, **kwargs)
            setattr(args[0], _FLAG, on_run_device(args[1]))
            return None
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__:  # CUDA tensors take CPU indices
            tensors = _tensors(args[0])
        elif func is torch.Tensor.__setitem__:
            tensors = _tensors([args[0], args[2]])
        else:
            tensors = _tensors((args, kwargs))
        flagged = any(on_run_device(t) for t in tensors)
        if flagged and func not in _MOVES:
            host = [tuple(t.shape) for t in tensors if not on_run_device(t) and t.dim() > 0]
            if host:
                self._record(
                    f"{getattr(func, '__qualname__', func)} mixes the run device with host tensors of shapes {host}"
                )
        if "device" in kwargs and kwargs["device"] is not None:
            flagged = _is_run_device(kwargs["device"])
        if not (func in _MOVES or (tensors and out is tensors[0])):  # in place: keeps its device
            _flag(out, flagged)
        return out

    def _move(self, func, args, kwargs):
        self_tensor = args[0]
        if func is torch.Tensor.cuda:
            target = True
        elif func is torch.Tensor.cpu:
            target = False
        else:
            spec = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    spec = AUDIT_DEVICE if on_run_device(a) else torch.device("cpu")
                elif _is_device_spec(a):
                    spec = a
            target = on_run_device(self_tensor) if spec is None else _is_run_device(spec)
        out = func(*args, **kwargs)
        if out is self_tensor and target != on_run_device(self_tensor):
            out = out.view_as(out)  # a CPU-to-CPU move returns self: give the moved copy its own flag
        setattr(out, _FLAG, target)
        return out
