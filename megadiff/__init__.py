"""megadiff: a Megatron-Core trainer for diffusion language models (LLaDA2)."""

from .platform.compat import defer_jit_fuser_compilation

# before anything imports megatron-core: its fused kernels compile when first called, not at import
defer_jit_fuser_compilation()
