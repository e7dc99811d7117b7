"""Routed experts as two `torch._grouped_mm` calls: megatron-core's SequentialMLP without its Python loop.

Without Transformer Engine, megatron-core trains routed experts with `SequentialMLP`: one MLP per
local expert, called one after another, after a `.tolist()` of the tokens per expert. On a GPU that
is two GEMMs per expert forward and four backward, plus the activation's kernels (32 local experts
x 19 MoE layers per micro-batch for LLaDA2-mini at EP=8): a step bound by kernel launches.
`TorchGroupedMLP` computes the same thing as one grouped GEMM per projection and direction:

    h   = x @ W1[e].T        for the rows x of each expert e     (fc1, [gate; up] per TP shard)
    a   = act(h) * probs     (silu(gate) * up, weighted by the router, as megatron-core's MLP does)
    out = a @ W2[e].T                                             (fc2; a partial sum under expert-TP)

It *is* a SequentialMLP (a subclass) with the same local experts, so parameter names
(`mlp.experts.local_experts.{e}.linear_fc1.weight`), `sharded_state_dict`, DDP, the optimizer,
checkpoints and converters are unchanged: only `forward` differs. The experts' linears are
megatron-core's local ColumnParallelLinear / RowParallelLinear; under expert parallelism and
expert-TP they do no communication of their own (the token dispatcher gathers the tokens and sums
fc2's partial outputs), so the local math above is all there is.

Offsets come from a cumulative sum of the token counts on the device (no host read of them), and an
expert without tokens gets an exact zero weight gradient (masked: some kernels leave garbage there).
Under megatron-core's DDP the weight gradients go straight into the main grads in one multi-tensor
add (`_weight_grads`), instead of one add per expert weight in DDP's hooks.
The stacked [experts, out, in] weights are a transient copy, made again in backward instead of being
kept alive between forward and backward (one more copy of the local expert weights per layer and
micro-batch, against keeping them all stacked until backward).
"""

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megadiff.errors import ConfigError
from megadiff.platform.kernels import grouped_mm_supported

MOE_EXPERTS = ("auto", "te", "grouped", "sequential")


class _GroupedLinear(torch.autograd.Function):
    """y = x @ W[e].T for the rows of each expert e (`offsets`: cumulative row counts), from the list
    of per-expert weights [out, in]. Saves the weights themselves, not their stacked copy."""

    @staticmethod
    def forward(ctx, x, offsets, has_tokens, *weights):
        ctx.save_for_backward(x, offsets, has_tokens, *weights)
        if x.shape[0] == 0:  # no tokens on this rank: the kernel refuses an empty operand
            return x.new_zeros(0, weights[0].shape[0])
        return torch._grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offsets)

    @staticmethod
    def backward(ctx, grad_y):
        x, offsets, has_tokens, *weights = ctx.saved_tensors
        wants_x, wants_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        if x.shape[0] == 0:  # no tokens: zero gradients (megatron-core's DDP waits for every weight's)
            grad_w = [torch.zeros_like(w) for w in weights] if wants_w else [None] * len(weights)
            return torch.zeros_like(x) if wants_x else None, None, None, *grad_w
        grad_y = grad_y.contiguous()
        grad_x = torch._grouped_mm(grad_y, torch.stack(weights), offs=offsets) if wants_x else None
        grad_w = [None] * len(weights)
        if wants_w:
            stacked = torch._grouped_mm(grad_y.t(), x, offs=offsets)  # [experts, out, in]
            stacked.masked_fill_(~has_tokens[:, None, None], 0.0)  # experts without tokens: exactly 0
            grad_w = _weight_grads(weights, stacked)
        return grad_x, None, None, *grad_w


def _weight_grads(weights, stacked: torch.Tensor):
    """The experts' weight gradients from their stacked [experts, out, in] gradient. Under
    megatron-core's DDP (every weight has a `main_grad`) they are added to the main grads in one
    multi-tensor op and autograd gets placeholders, as megatron-core's fused weight-gradient
    accumulation does: DDP's hook then skips its add, which would be one kernel per expert weight."""
    if not all(hasattr(w, "main_grad") and hasattr(w, "grad_added_to_main_grad") for w in weights):
        return stacked.unbind(0)
    main_grads = [w.main_grad for w in weights]
    torch._foreach_add_(main_grads, stacked.to(main_grads[0].dtype).unbind(0))
    placeholders = []
    for w in weights:
        w.grad_added_to_main_grad = True
        make = torch.zeros if getattr(w, "zero_out_wgrad", False) else torch.empty
        placeholders.append(make(w.main_grad.shape, dtype=stacked.dtype, device=stacked.device))
    return placeholders


class TorchGroupedMLP(SequentialMLP):
    """SequentialMLP's experts, parameters and checkpoint layout; forward as grouped GEMMs (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        unsupported = {
            "add_bias_linear": c.add_bias_linear,  # megatron-core's grouped MLPs have no expert biases either
            "fp8": c.fp8,
            "fp4": getattr(c, "fp4", None),
            "use_te_activation_func": getattr(c, "use_te_activation_func", False),
            "delay_wgrad_compute": getattr(c, "delay_wgrad_compute", False),
        }
        bad = {k: v for k, v in unsupported.items() if v}
        if bad:
            raise ConfigError(
                f"grouped experts (torch._grouped_mm) do not support {bad}; use the sequential or TE experts"
            )
        if c.bias_activation_fusion and not (c.gated_linear_unit and c.activation_func is F.silu):
            raise ConfigError("grouped experts fuse only the gated silu activation; set bias_activation_fusion=False")

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        self._check_plain_linears()
        x, probs = permuted_local_hidden_states.contiguous(), permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: weigh the input, not the output
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        # The alltoall dispatcher hands the counts over on the host, others on the device: either
        # way the offsets are a cumulative sum on the device and nothing is read back.
        counts = tokens_per_expert.to(device=x.device, non_blocking=True)
        offsets = counts.cumsum(0).to(torch.int32)
        has_tokens = counts > 0
        experts = self.local_experts
        h = _GroupedLinear.apply(x, offsets, has_tokens, *[e.linear_fc1.weight for e in experts])
        a = self._activation(h, probs)
        out = _GroupedLinear.apply(a, offsets, has_tokens, *[e.linear_fc2.weight for e in experts])
        return out, None

    def _activation(self, h, probs):
        """act(h) * probs in h's dtype, as megatron-core's MLP computes it for an expert."""
        c = self.config
        if c.bias_activation_fusion:  # the fused kernel megatron-core's MLP uses on CUDA
            return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1), c.activation_func_fp8_input_store)
        if c.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            if (clamp := c.activation_func_clamp_value) is not None:
                gate, up = gate.clamp(max=clamp), up.clamp(min=-clamp, max=clamp)
            a = c.activation_func(gate) * (up + c.glu_linear_offset)
        else:
            a = c.activation_func(h)
        return (a * probs.unsqueeze(-1)).to(h.dtype)

    def _check_plain_linears(self) -> None:
        """The grouped GEMMs multiply the experts' weights directly, so a wrapped expert linear (a
        LoRA adapter) would be skipped: refuse it. Reads `_modules` (cheap on every forward)."""
        for expert in self.local_experts._modules.values():
            fc1, fc2 = expert._modules["linear_fc1"], expert._modules["linear_fc2"]
            if type(fc1) is not ColumnParallelLinear or type(fc2) is not RowParallelLinear:
                raise ConfigError(
                    f"grouped experts multiply each expert's own weights, but an expert linear is a "
                    f"{type(fc1).__name__} / {type(fc2).__name__} (LoRA on routed experts?): its extra "
                    f"computation would be skipped; use perf.moe_experts=sequential with lora.experts=true"
                )


def grouped_experts_spec(spec):
    """`spec` (a layer-spec entry) with megatron-core's SequentialMLP replaced by TorchGroupedMLP on
    local linears, or None when it is not a SequentialMLP entry. megatron-core 0.16 writes the entry
    as a ModuleSpec, 0.19 as a functools.partial; the TE spec's expert linears become local ones."""
    if isinstance(spec, ModuleSpec) and spec.module is SequentialMLP:
        return dataclasses.replace(spec, module=TorchGroupedMLP, submodules=_local_linears(spec.submodules))
    if isinstance(spec, functools.partial) and spec.func is SequentialMLP:
        keywords = dict(spec.keywords, submodules=_local_linears(spec.keywords["submodules"]))
        return functools.partial(TorchGroupedMLP, *spec.args, **keywords)
    return None


def with_grouped_experts(block_spec):
    """`block_spec` (a decoder block spec) with every MoE layer's SequentialMLP experts replaced by
    TorchGroupedMLP (`grouped_experts_spec`); dense layers are left alone. megatron-core 0.16
    describes an MoE layer as ModuleSpec(MoELayer, submodules=MoESubmodules), 0.17+ as
    functools.partial(MoELayer, submodules=MoESubmodules); both carry the experts in
    MoESubmodules.experts. Any family's block spec can go through it."""

    def swap(mlp):
        if isinstance(mlp, functools.partial):
            submodules = mlp.keywords.get("submodules")
        else:
            submodules = getattr(mlp, "submodules", None)
        grouped = grouped_experts_spec(getattr(submodules, "experts", None))
        if grouped is None:
            return mlp
        submodules = dataclasses.replace(submodules, experts=grouped)
        if isinstance(mlp, functools.partial):
            return functools.partial(mlp.func, *mlp.args, **dict(mlp.keywords, submodules=submodules))
        return dataclasses.replace(mlp, submodules=submodules)

    layers = [
        dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=swap(layer.submodules.mlp)))
        for layer in block_spec.layer_specs
    ]
    return dataclasses.replace(block_spec, layer_specs=layers)


def _local_linears(submodules):
    return dataclasses.replace(submodules, linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


# ---- which experts a model gets ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertsChoice:
    backend: str  # "te" (TEGroupedMLP), "grouped" (TorchGroupedMLP) or "sequential" (SequentialMLP)
    reason: str


def grouped_problem(dtype: torch.dtype, hidden_size: int, ffn_per_rank: int, runs: bool | None = None) -> str | None:
    """Why grouped experts cannot run here (None: they can): torch._grouped_mm must run on the run
    device in `dtype` (`runs`; None: ask megadiff.platform.kernels, which probes it), and it takes
    matrices whose rows are whole multiples of 16 bytes (hidden_size, and the expert hidden size
    per expert-TP rank)."""
    name = str(dtype).removeprefix("torch.")
    if not (grouped_mm_supported(dtype) if runs is None else runs):
        return f"torch._grouped_mm (torch {torch.__version__}) does not run in {name} on the run device"
    per_row = 16 // dtype.itemsize
    for what, size in (("hidden_size", hidden_size), ("the expert hidden size per expert-TP rank", ffn_per_rank)):
        if size % per_row:
            return f"torch._grouped_mm needs rows of a multiple of 16 bytes, and {what}={size} in {name} is not"
    return None


def choose_experts(requested: str, te_usable: bool, grouped_why_not: str | None, key: str) -> ExpertsChoice:
    """Resolve `requested` (one of MOE_EXPERTS, under the config key or flag `key`): auto = TE's
    grouped MLP where megatron-core can use TE, else grouped experts where torch._grouped_mm runs
    (`grouped_why_not` is None), else sequential. An impossible request raises ConfigError naming `key`."""
    if requested not in MOE_EXPERTS:
        raise ConfigError(f"{key}={requested!r}; choose one of {', '.join(MOE_EXPERTS)}")
    if requested == "te" and not te_usable:
        raise ConfigError(
            f"{key}=te: Transformer Engine's grouped experts need a CUDA run where megatron-core imports TE, "
            f"and this one has none; use {key}=grouped or sequential (or auto)"
        )
    if requested == "grouped" and grouped_why_not:
        raise ConfigError(f"{key}=grouped: {grouped_why_not}; use {key}=sequential (or auto)")
    if requested != "auto":
        return ExpertsChoice(requested, f"{key}={requested}")
    if te_usable:
        return ExpertsChoice("te", "auto: Transformer Engine's grouped GEMM (TEGroupedMLP)")
    if grouped_why_not is None:
        return ExpertsChoice("grouped", "auto: no Transformer Engine; torch._grouped_mm runs here")
    return ExpertsChoice("sequential", f"auto: no Transformer Engine, and {grouped_why_not}")
