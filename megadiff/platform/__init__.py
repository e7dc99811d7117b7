"""Where megadiff meets the hardware: the run device, process groups, CPU/gloo support for
megatron-core, and which optional GPU kernels (TE, apex) this process can use."""

_DISTRIBUTED = ("init_distributed", "initialize_parallel", "is_rank0", "on_gpu", "print_rank0")
_DEVICE = ("run_device", "to_run_device", "uses_cuda", "default_params_dtype")


def install_import_hook() -> None:
    """Make megatron-core's import-time `torch.compile` calls compile on first call instead.

    Call it first in every entry point (tools/*.py, torchrun workers, tests/conftest.py), before
    anything imports megatron-core: megatron.core.jit binds `jit_fuser = torch.compile` and a dozen
    fusion modules apply it while they are imported, which imports TorchDynamo (1.5-2 s of every
    process's start-up) even in processes that never call a fused function. With the hook they
    compile when first called, as TorchDynamo would anyway (compat.compile_on_first_call). Without
    it everything still works, only start-up is slower. A no-op once megatron-core is imported or
    the hook is in place. Needs only the standard library."""
    from .compat import defer_jit_fuser_compilation

    defer_jit_fuser_compilation()


def __getattr__(name):
    # This package is imported by every entry point first (install_import_hook); that must not
    # import torch for code that never uses it.
    if name in _DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    if name in _DEVICE:
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["install_import_hook", *_DISTRIBUTED, *_DEVICE]
