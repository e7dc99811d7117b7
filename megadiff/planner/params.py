"""The parameter tensors one rank holds, from the model config and the layout alone (no torch).

The list follows megatron-core's registration order for megadiff's local layer spec (the order
`named_parameters()` yields), because megatron-core's DDP lays the gradient buffer out in that
order (reversed) and the distributed optimizer's shard of a rank depends on it. With Transformer
Engine the names and the order differ a little (norms fused into the next linear, grouped experts)
but every tensor has the same size, so only the few padding elements move.

Sizes per rank: column- and row-parallel linears are split by tp (experts by etp), norms and the
router are replicated, the embedding and the output layer are split over the vocabulary. Routed
experts are split over ep (E/ep local experts); megatron-core treats them as expert-parallel
parameters (own gradient buffer, sharded over the expert-data-parallel group) only when ep > 1.
"""

from dataclasses import dataclass
from functools import lru_cache

from megadiff.models.llada2.config import LLaDA2ModelConfig, ParallelLayout


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    expert: bool = False  # a routed-expert weight (expert-parallel when ep > 1)
    trainable: bool = True  # False: frozen base weight under LoRA (no gradient, no optimizer state)


def chunk_layers(model: LLaDA2ModelConfig, layout: ParallelLayout, pp_rank: int, vp: int = 0) -> range:
    """Global layer numbers (0-based) of virtual chunk `vp` on pipeline rank `pp_rank`
    (megatron-core's even split: chunk vp holds the vp-th slice of every rank's share)."""
    vpp = layout.vpp or 1
    per_chunk = model.num_hidden_layers // (layout.pp * vpp)
    start = vp * (model.num_hidden_layers // vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


def _attention(model, layout, prefix):
    h, d, tp = model.hidden_size, model.head_dim, layout.tp
    nq, nkv = model.num_attention_heads, model.num_key_value_heads
    out = [
        ParamTensor(f"{prefix}.input_layernorm.weight", h),
        ParamTensor(f"{prefix}.self_attention.linear_proj.weight", h * nq * d // tp),
        ParamTensor(f"{prefix}.self_attention.linear_qkv.weight", (nq + 2 * nkv) * d // tp * h),
    ]
    if model.use_qk_norm:
        out += [
            ParamTensor(f"{prefix}.self_attention.q_layernorm.weight", d),
            ParamTensor(f"{prefix}.self_attention.k_layernorm.weight", d),
        ]
    return out + [ParamTensor(f"{prefix}.pre_mlp_layernorm.weight", h)]


def _mlp(model, layout, prefix, layer):
    h, tp = model.hidden_size, layout.tp
    if layer < model.first_k_dense_replace:
        i = model.intermediate_size
        return [
            ParamTensor(f"{prefix}.mlp.linear_fc1.weight", 2 * i // tp * h),
            ParamTensor(f"{prefix}.mlp.linear_fc2.weight", h * i // tp),
        ]
    fm, etp = model.moe_intermediate_size, layout.etp
    out = [ParamTensor(f"{prefix}.mlp.router.weight", model.num_experts * h)]
    for e in range(model.num_experts // layout.ep):
        out += [
            ParamTensor(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc1.weight", 2 * fm // etp * h, expert=True),
            ParamTensor(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc2.weight", h * fm // etp, expert=True),
        ]
    fs = fm * model.num_shared_experts
    if fs:
        out += [
            ParamTensor(f"{prefix}.mlp.shared_experts.linear_fc1.weight", 2 * fs // tp * h),
            ParamTensor(f"{prefix}.mlp.shared_experts.linear_fc2.weight", h * fs // tp),
        ]
    return out


def _lora(model, layout, base: list[ParamTensor], rank: int) -> list[ParamTensor]:
    """LoRA adapters on the attention projections and the dense layer's MLP (NeMo's LLaDA2
    targets; experts, shared experts and the router stay frozen). Column-parallel base: A [r, in]
    replicated, B [out/tp, r]; row-parallel base: A [r, in/tp], B [out, r] replicated."""
    h, d, tp = model.hidden_size, model.head_dim, layout.tp
    nq, nkv, i = model.num_attention_heads, model.num_key_value_heads, model.intermediate_size
    shapes = {  # leaf -> (in, out, column_parallel)
        "self_attention.linear_qkv.weight": (h, (nq + 2 * nkv) * d, True),
        "self_attention.linear_proj.weight": (nq * d, h, False),
        "mlp.linear_fc1.weight": (h, 2 * i, True),
        "mlp.linear_fc2.weight": (i, h, False),
    }
    out = []
    for p in base:
        for leaf, (n_in, n_out, column) in shapes.items():
            if p.name.endswith("." + leaf) and ".experts." not in p.name:
                stem = p.name.removesuffix(".weight")
                a, b = (rank * n_in, n_out // tp * rank) if column else (rank * n_in // tp, n_out * rank)
                out += [
                    ParamTensor(f"{stem}.adapter.linear_in.weight", a),
                    ParamTensor(f"{stem}.adapter.linear_out.weight", b),
                ]
    return out


@lru_cache(maxsize=4096)  # the planner asks for the same rank many times (memory, step time, dp ranks)
def rank_parameters(
    model: LLaDA2ModelConfig, layout: ParallelLayout, pp_rank: int, vp: int = 0, lora_rank: int | None = None
) -> tuple[ParamTensor, ...]:
    """The parameters of virtual chunk `vp` on pipeline rank `pp_rank`, in registration order.
    With `lora_rank`, base weights are frozen and the adapters come after them."""
    vpp = layout.vpp or 1
    first = pp_rank == 0 and vp == 0
    last = pp_rank == layout.pp - 1 and vp == vpp - 1
    v, h, tp = model.vocab_size, model.hidden_size, layout.tp
    out = [ParamTensor("embedding.word_embeddings.weight", v // tp * h)] if first else []
    for layer in chunk_layers(model, layout, pp_rank, vp):
        prefix = f"decoder.layers.{layer}"
        out += _attention(model, layout, prefix) + _mlp(model, layout, prefix, layer)
    if last:
        out += [ParamTensor("decoder.final_layernorm.weight", h), ParamTensor("output_layer.weight", v // tp * h)]
    if lora_rank:
        adapters = _lora(model, layout, out, lora_rank)
        out = [ParamTensor(p.name, p.numel, p.expert, trainable=False) for p in out] + adapters
    return tuple(out)


def total_params(model: LLaDA2ModelConfig) -> int:
    """Every parameter of the model (one copy: the layout (1, 1, 1))."""
    return sum(p.numel for p in rank_parameters(model, ParallelLayout(), 0))


def active_params(model: LLaDA2ModelConfig) -> int:
    """Parameters one token passes through: everything but the routed experts, plus top-k of E of them."""
    params = rank_parameters(model, ParallelLayout(), 0)
    routed = sum(p.numel for p in params if p.expert)
    dense = sum(p.numel for p in params if not p.expert)
    return dense + routed * model.num_experts_per_tok // model.num_experts
