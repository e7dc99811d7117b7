"""Count, on a CPU-only machine, the places where a GPU run would wait for the GPU.

The host reads a value of a tensor that lives on the run device (`.item()`, `float()`, `int()`,
`bool()`, `.tolist()`, `if t > 0:`, formatting) and the CPU stops until every kernel queued before
it has run: the CPU can no longer run ahead of the GPU, and a step of small kernels becomes bound by
their launches. Ops whose output shape depends on the data (boolean-mask indexing, `nonzero`,
`masked_select`, `unique`, `bincount`, `repeat_interleave` by a tensor) and copies to the host wait
the same way. So does a copy from the host to the device that is not `non_blocking` (torch
synchronises the stream after it: `.to(device)`, `torch.tensor(x, device=...)`), and so do copies to
the host.

On the CPU nothing waits, so such a read is invisible. `HostReadCounter` is a
`device_audit.DeviceAudit` (which tells tensors "on the run device" from host tensors, with real
numerics) that also records every such read of a run-device tensor. Host tensors are free to read:
the data side builds batches on the host and moves them once.

Reads made inside the model's layers (a frame in megatron-core's `transformer/` package: e.g. the
MoE token dispatcher, which needs the tokens per expert on the host) are kept apart in
`model_where`; `where` holds the rest (the training loop, the loss, the optimizer step). For tests
only.
"""

import traceback

import torch

from megadiff.platform.device_audit import DeviceAudit, _is_run_device, _tensors, on_run_device

# The host reads the value: the CPU waits for the device.
_READS = {
    torch.Tensor.item: "item()",
    torch.Tensor.tolist: "tolist()",
    torch.Tensor.numpy: "numpy()",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__index__: "index()",
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.__format__: "format()",
    torch.Tensor.__repr__: "repr()",
}
# The output's size depends on the data: the host must read it before allocating.
_DATA_DEPENDENT = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    torch.Tensor.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
}
_REPEAT_INTERLEAVE = (torch.repeat_interleave, torch.Tensor.repeat_interleave)
_FACTORIES_FROM_DATA = (torch.tensor, torch.as_tensor)
_MODEL_LAYERS = "/megatron/core/transformer/"


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if not f.filename.endswith(("device_audit.py", "host_reads.py"))]
    return "; ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:])


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _data_dependent(func, args, kwargs) -> str | None:
    """What makes this call wait for the device, or None (args[0] is on the run device)."""
    if func in _DATA_DEPENDENT:
        return _DATA_DEPENDENT[func]
    if func in _REPEAT_INTERLEAVE:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave by a tensor"
        return None
    if func is torch.Tensor.__getitem__ and _has_bool_index(args[1]):
        return "boolean-mask indexing"
    if func is torch.Tensor.__setitem__ and _has_bool_index(args[1]):
        value = args[2]
        # a scalar value is a masked_fill_ (no wait); anything else goes through nonzero()
        if isinstance(value, torch.Tensor) and (value.numel() > 1 or on_run_device(value)):
            return "boolean-mask assignment"
    return None


class HostReadCounter(DeviceAudit):
    """`with HostReadCounter() as reads: ...`, then `reads.where` / `reads.model_where` (one line
    per read: what, and the innermost frames outside torch) and `reads.count` (len(where))."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self.model_where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def _read(self, what: str) -> None:
        in_model = any(_MODEL_LAYERS in frame.filename for frame in traceback.extract_stack())
        (self.model_where if in_model else self.where).append(f"{what} at {_where()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and on_run_device(first):
            what = _READS.get(func) or _data_dependent(func, args, kwargs)
            if what:
                self._read(what)
        elif func in _FACTORIES_FROM_DATA:
            # torch.tensor([t, ...]) reads every run-device t; with device=the run device it
            # builds on the host and copies without non_blocking
            for t in _tensors(args):
                if on_run_device(t):
                    self._read("torch.tensor() of a run-device value")
            if kwargs.get("device") is not None and _is_run_device(kwargs["device"]):
                self._read("torch.tensor(host data, device=run device): a blocking copy")
        elif func is torch.Tensor.copy_ and on_run_device(args[0]) and not on_run_device(args[1]):
            if not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
                self._read("blocking copy_ to the device")
        return super().__torch_function__(func, types, args, kwargs)

    def _move(self, func, args, kwargs):
        out = super()._move(func, args, kwargs)
        if on_run_device(args[0]) and not on_run_device(out):
            self._read("copy to the host")
        elif on_run_device(out) and not on_run_device(args[0]) and not kwargs.get("non_blocking"):
            self._read("blocking copy to the device")
        return out
