"""Where megadiff meets the hardware: the run device, process groups, CPU/gloo support for
megatron-core, and which optional GPU kernels (TE, apex) this process can use."""

_DISTRIBUTED = ("init_distributed", "initialize_parallel", "is_rank0", "on_gpu", "print_rank0")
_DEVICE = ("run_device", "to_run_device", "uses_cuda", "default_params_dtype")


def __getattr__(name):
    # `import megadiff` installs the megatron-core import hook from this package
    # (compat.py); that must not import torch for code that never uses it.
    if name in _DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    if name in _DEVICE:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_DISTRIBUTED + _DEVICE)
