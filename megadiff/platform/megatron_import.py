"""Import megatron-core without compiling its fused kernels up front.

`megatron.core.jit` binds `jit_fuser = torch.compile` when it is imported, and a dozen fusion
modules decorate their functions with it at import time. Each `torch.compile(fn)` call imports
TorchDynamo (sympy, networkx, ...): 1.5-2 s of every process's start-up (measured: importing
`megatron.core.models.gpt` takes 2.8 s with it, 0.9 s without), paid even by tools that never
call a fused function, such as the checkpoint converters, and by every torchrun worker.

`defer_jit_fuser_compilation()` installs an import hook that, only while `megatron.core.jit`
runs, swaps `torch.compile` for a wrapper that calls the real `torch.compile(fn, **options)` on
the function's first call. TorchDynamo compiles on the first call anyway, so fused functions
behave as before; they only stop costing anything in processes that never run them.
"""

import functools
import importlib.abc
import importlib.util
import sys

_MODULE = "megatron.core.jit"


def compile_on_first_call(compile_fn):
    """A `torch.compile` look-alike that defers calling `compile_fn` until the result is called."""

    def deferred_compile(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred_compile


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` through the normal finders, then runs it with the deferred compile."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # one module, once; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_deferred_compile(module):
            import torch

            real_compile = torch.compile
            torch.compile = compile_on_first_call(real_compile)
            try:
                exec_module(module)
            finally:
                torch.compile = real_compile

        spec.loader.exec_module = exec_with_deferred_compile
        return spec


def defer_jit_fuser_compilation() -> None:
    """Install the hook; a no-op when megatron-core is already imported or the hook is in place."""
    if _MODULE in sys.modules or any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferJitFuser())
