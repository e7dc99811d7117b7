"""Which optional GPU pieces this process can use: Transformer Engine and apex's fused kernels.

One place decides, from what megatron-core itself can import, so a plain `pip install` on a GPU
node (no TE, no apex) builds a working model, and nothing meant for CPU runs leaks into CUDA runs:

- Transformer Engine: megatron-core's own `HAVE_TE` flags (the TE spec's module and the TE
  extension). `import transformer_engine` alone is not enough: with an ABI mismatch it imports
  while megatron-core's flags stay False, and the TE spec then fails with NameErrors.
- `masked_softmax_fusion`: megatron-core's FusedScaleMaskSoftmax imports apex's
  `scaled_masked_softmax_cuda` on the first bf16 softmax; only switched on where it imports.
- `gradient_accumulation_fusion`: needs apex's `fused_weight_gradient_mlp_cuda`.
- `bias_activation_fusion` / `bias_dropout_fusion`: megatron-core's own jit-fused torch code;
  on for CUDA, off on the CPU (fp32 tests compare with the unfused reference).
- `persist_layer_norm` (apex's persistent LayerNorm) does not apply to LLaDA2's RMSNorm: off.
"""

import dataclasses
import functools
import importlib

from megadiff.platform.device import uses_cuda


@functools.cache
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or OSError / RuntimeError from a broken compiled extension
        return False
    return True


@functools.cache
def megatron_has_te() -> bool:
    """megatron-core's own verdict: its TE extension and the GPT TE spec both imported TE."""
    try:  # Transformer Engine is optional; importing megatron-core's TE modules tells if it works
        from megatron.core.extensions import transformer_engine as te_extension
        from megatron.core.models.gpt import gpt_layer_specs
    except Exception:
        return False
    return bool(getattr(te_extension, "HAVE_TE", False) and getattr(gpt_layer_specs, "HAVE_TE", False))


def transformer_engine_usable() -> bool:
    """Use the TE spec: the run device is CUDA and megatron-core can use TE."""
    return uses_cuda() and megatron_has_te()


def apex_fused_softmax_available() -> bool:
    return _imports("scaled_masked_softmax_cuda")


def apex_fused_wgrad_available() -> bool:
    return _imports("fused_weight_gradient_mlp_cuda")


def deepep_available() -> bool:
    """DeepEP, which megatron-core's flex token dispatcher needs (megatron.core.transformer.moe.fused_a2a)."""
    return _imports("deep_ep")


def grouped_gemm_available() -> bool:
    """The `grouped_gemm` package behind megatron-core's legacy GroupedMLP (the local spec's grouped GEMM)."""
    return _imports("grouped_gemm")


@dataclasses.dataclass(frozen=True)
class Environment:
    """What a run can use, as the speed-option checks see it (tests build one by hand)."""

    on_cuda: bool
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    gpu_memory_bytes: int | None = None
    te: bool = False  # megatron-core can use Transformer Engine
    deepep: bool = False
    apex_wgrad: bool = False
    grouped_gemm: bool = False


def probe_environment() -> Environment:
    """This process's Environment (the run device's GPU, and what megatron-core can import)."""
    from megadiff.platform.device import run_device, uses_cuda

    if not uses_cuda():
        return Environment(on_cuda=False, grouped_gemm=grouped_gemm_available())
    import torch

    device = run_device()
    props = torch.cuda.get_device_properties(device)
    return Environment(
        on_cuda=True,
        gpu_name=props.name,
        compute_capability=(props.major, props.minor),
        gpu_memory_bytes=props.total_memory,
        te=megatron_has_te(),
        deepep=deepep_available(),
        apex_wgrad=apex_fused_wgrad_available(),
        grouped_gemm=grouped_gemm_available(),
    )


def fused_kernel_flags(on_cuda: bool) -> dict:
    """TransformerConfig fusion settings for a CPU or a CUDA run (see the module docstring)."""
    return dict(
        bias_activation_fusion=on_cuda,
        bias_dropout_fusion=on_cuda,
        masked_softmax_fusion=on_cuda and apex_fused_softmax_available(),
        gradient_accumulation_fusion=on_cuda and apex_fused_wgrad_available(),
        persist_layer_norm=False,
    )


def kernel_report() -> dict:
    """What this process can use, for environment reports (tools/gpu_check.py)."""
    return {
        "megatron_core_has_te": megatron_has_te(),
        "transformer_engine_importable": _imports("transformer_engine"),
        "apex_importable": _imports("apex"),
        "apex_fused_softmax": apex_fused_softmax_available(),
        "apex_fused_wgrad": apex_fused_wgrad_available(),
        "deep_ep_importable": deepep_available(),
        "grouped_gemm_importable": grouped_gemm_available(),
    }
