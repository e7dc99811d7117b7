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
- `torch._grouped_mm` (megadiff's grouped experts without TE, a private torch op): whether it runs,
  and gives the right numbers, on the run device in a dtype is probed once per process on a tiny
  problem (`grouped_mm_supported`). It ran on the CPU in fp32 and bf16 with torch 2.11 and 2.13
  here; on CUDA it depends on the GPU, the dtype and the build, so the kernel itself is asked.
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
    """The `grouped_gemm` package behind megatron-core's legacy GroupedMLP (reported, not used)."""
    return _imports("grouped_gemm")


GROUPED_MM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # model.dtype name -> torch dtype name


def grouped_mm_dtypes(device=None) -> tuple[str, ...]:
    """The model.dtype names ("bf16", "fp32") torch._grouped_mm runs in on `device` (default: the run device)."""
    return tuple(name for name in GROUPED_MM_DTYPES if grouped_mm_supported(name, device))


def grouped_mm_supported(dtype, device=None) -> bool:
    """torch._grouped_mm runs on `device` (default: the run device) in `dtype` and matches a plain
    per-group matmul there, in the three forms grouped experts use (forward, input and weight
    gradients), on groups of uneven size with an empty one. Probed once per (device, dtype)."""
    from megadiff.platform.device import run_device

    name = GROUPED_MM_DTYPES.get(dtype) or str(dtype).removeprefix("torch.")  # "bf16" or torch.bfloat16
    return _grouped_mm_probe(str(device or run_device()), name)


@functools.cache
def _grouped_mm_probe(device: str, dtype_name: str) -> bool:
    import torch

    if not hasattr(torch, "_grouped_mm"):
        return False
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 19]  # uneven groups (offsets not multiples of 8) and an expert without tokens
    x = torch.randn(sum(counts), 16, generator=g).to(dtype)
    w = torch.randn(len(counts), 32, 16, generator=g).to(dtype)  # [experts, out, in], as nn.Linear
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    try:
        on = dict(device=torch.device(device))
        xd, wd, od = x.to(**on), w.to(**on), offsets.to(**on)
        y = torch._grouped_mm(xd, wd.transpose(-2, -1), offs=od)  # forward: [tokens, out]
        dx = torch._grouped_mm(y, wd, offs=od)  # input gradient: [tokens, in]
        dw = torch._grouped_mm(y.t(), xd, offs=od)  # weight gradient: [experts, out, in]
        y, dx, dw = y.float().cpu(), dx.float().cpu(), dw.float().cpu()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # no kernel for this device / dtype
        return False
    xs, ys = x.float().split(counts), y.split(counts)
    want_y = torch.cat([xe @ we.t() for xe, we in zip(xs, w.float(), strict=True)])
    want_dx = torch.cat([ye @ we for ye, we in zip(ys, w.float(), strict=True)])
    # an empty group's weight gradient is not compared: callers zero it (B200 kernels leave garbage)
    used = [e for e, n in enumerate(counts) if n]
    want_dw = torch.stack([ys[e].t() @ xs[e] for e in used])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = ((y, want_y), (dx, want_dx), (dw[used], want_dw))
    return all(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())) for got, want in pairs)


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
    grouped_mm_dtypes: tuple[str, ...] = ()  # model.dtype names torch._grouped_mm runs in on the run device


def probe_environment() -> Environment:
    """This process's Environment (the run device's GPU, and what megatron-core can import)."""
    from megadiff.platform.device import run_device, uses_cuda

    if not uses_cuda():
        return Environment(on_cuda=False, grouped_mm_dtypes=grouped_mm_dtypes())
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
        grouped_mm_dtypes=grouped_mm_dtypes(),
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
        "torch_grouped_mm_dtypes": list(grouped_mm_dtypes()),
    }
