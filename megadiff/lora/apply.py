"""Put LoRA adapters on the targeted linears of model chunks (any family) and freeze everything else.

Targets are megatron-core module names: `linear_qkv`, `linear_proj` (attention), `linear_fc1`,
`linear_fc2` (the dense layer's MLP and the shared experts; routed experts only with
`experts=True`, one adapter per expert on its EP rank). The router is never adapted.

Initialisation does not depend on the layout: each adapter tensor is drawn whole from a generator
seeded by (seed, its global name) and then split, so every TP/EP/PP layout starts from the same
adapters. `init="kaiming"`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, kaiming-uniform with
a=sqrt(5)), B = 0; `init="gaussian"`: A ~ N(0, 1/r), B = 0 (PEFT's "gaussian").

Only the local spec's torch linears (ColumnParallelLinear / RowParallelLinear, SequentialMLP experts)
can be adapted: Transformer Engine's layernorm-fused linears and grouped-GEMM experts are refused,
and so are routed experts built as grouped experts (TorchGroupedMLP, perf.moe_experts=grouped),
whose forward multiplies the experts' weights without calling their linears.
"""

import hashlib
import math
import re

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megadiff.errors import UserError
from megadiff.models.common.grouped_experts import TorchGroupedMLP

from .adapters import LoRAColumnParallel, LoRARowParallel, _LoRAMixin, lora_class, shard

TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
INITS = ("kaiming", "gaussian")

# A linear in a decoder layer: attention, dense MLP, shared expert or routed expert (local spec).
_TARGET = re.compile(
    r"^decoder\.layers\.(?P<layer>\d+)\.(?P<path>self_attention|mlp|mlp\.shared_experts|"
    r"mlp\.experts\.local_experts\.(?P<expert>\d+)|mlp\.experts)\.(?P<leaf>linear_\w+)$"
)


class LoRAConfigError(UserError):
    """A LoRA setting that cannot be used (names the `lora.*` field)."""


def check_adapter_config(rank, alpha, dropout, target_modules, experts, init, seed) -> None:
    """Raise naming the field for a setting apply_lora cannot use (also checks the contract dict)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAConfigError(f"lora.rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAConfigError(f"lora.alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LoRAConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")
    if not target_modules:
        raise LoRAConfigError(f"lora.target_modules is empty; choose from {', '.join(TARGET_MODULES)}")
    for name in target_modules:
        if name not in TARGET_MODULES:
            raise LoRAConfigError(
                f"lora.target_modules: unknown target module {name!r}; choose from {', '.join(TARGET_MODULES)} "
                f"(megatron-core names; the router is never adapted)"
            )
    if init not in INITS:
        raise LoRAConfigError(f"lora.init={init!r}; choose one of {', '.join(INITS)}")
    if not isinstance(seed, int) or seed < 0:
        raise LoRAConfigError(f"lora.seed must be an integer >= 0, got {seed!r}")


def _unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    module = chunk
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def adapted_modules(chunks):
    """(global module name, module) of every adapted linear on this rank."""
    for chunk in chunks:
        for module in _unwrap(chunk).modules():
            if isinstance(module, _LoRAMixin):
                yield module.lora_name, module


def _targets(model, target_modules, experts: bool):
    """(local name, global name, module) of the linears to adapt in one chunk."""
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for name, module in model.named_modules():
        m = _TARGET.match(name)
        if not m or m["leaf"] not in target_modules:
            continue
        routed = m["path"].startswith("mlp.experts")
        if routed and not experts:
            continue
        if m["expert"] is None and routed or not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            raise LoRAConfigError(
                f"lora: {name} is a {type(module).__name__}; LoRA adapts only megatron-core's local-spec "
                f"linears (ColumnParallelLinear / RowParallelLinear, SequentialMLP experts), not Transformer "
                f"Engine's fused or grouped ones: run without Transformer Engine for LoRA"
            )
        if m["expert"] is not None and isinstance(model.decoder.layers[int(m["layer"])].mlp.experts, TorchGroupedMLP):
            raise LoRAConfigError(
                f"lora.experts=true: {name} belongs to grouped experts (perf.moe_experts=grouped), whose "
                f"forward does not call the experts' linears, so an adapter there would be skipped; set "
                f"perf.moe_experts=sequential (or auto) or lora.experts=false"
            )
        layer = model.decoder.layers[int(m["layer"])].layer_number - 1  # layer_number is 1-based
        path = m["path"]
        if m["expert"] is not None:
            n_local = len(model.decoder.layers[int(m["layer"])].mlp.experts.local_experts)
            path = f"mlp.experts.local_experts.{ep_rank * n_local + int(m['expert'])}"
        yield name, f"decoder.layers.{layer}.{path}.{m['leaf']}", module


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)


def initial_adapter(global_name: str, in_features: int, out_features: int, rank: int, init: str, seed: int):
    """Whole (lora_A [r, in], lora_B [out, r]) for the adapter at `global_name`, fp32 on the CPU."""
    g = torch.Generator().manual_seed(_seed_for(seed, global_name))
    if init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=g)
    else:
        a = torch.empty(rank, in_features).normal_(0.0, 1.0 / rank, generator=g)
    return a, torch.zeros(out_features, rank)


def apply_lora(chunks, rank, alpha, dropout, target_modules, experts, init, seed) -> list[str]:
    """Adapt the targeted linears of every chunk in place, freeze all other parameters, and return
    the global names of this rank's adapters. Call after the base weights are loaded and before
    the DDP wrapper and the optimizer are built (they then see only the adapters)."""
    check_adapter_config(rank, alpha, dropout, target_modules, experts, init, seed)
    names = []
    for chunk in chunks:
        model = _unwrap(chunk)
        for p in model.parameters():
            p.requires_grad_(False)
        gated = model.config.gated_linear_unit
        for local_name, global_name, module in list(_targets(model, target_modules, experts)):
            mixin = LoRAColumnParallel if isinstance(module, ColumnParallelLinear) else LoRARowParallel
            module.__class__ = lora_class(type(module), mixin)
            module.lora_name = global_name
            module.lora_gated = gated and local_name.endswith("linear_fc1")
            a, b = initial_adapter(global_name, module.input_size, module.output_size, rank, init, seed)
            group_rank, group_size = module.tp_group.rank(), module.tp_group.size()
            like = dict(dtype=module.weight.dtype, device=module.weight.device)
            module.add_lora(
                shard(a, module.split_of("lora_A"), group_rank, group_size).to(**like).contiguous(),
                shard(b, module.split_of("lora_B"), group_rank, group_size).to(**like).contiguous(),
                scale=alpha / rank,
                dropout=dropout,
                gated=module.lora_gated,
            )
            names.append(global_name)
    return names
