"""Where megadiff meets the hardware: process groups, and CPU/gloo support for megatron-core."""

_DISTRIBUTED = ("init_distributed", "initialize_parallel", "is_rank0", "on_gpu", "print_rank0")


def __getattr__(name):
    # `import megadiff` installs the megatron-core import hook from this package
    # (compat.py); that must not import torch for code that never uses it.
    if name in _DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_DISTRIBUTED)
