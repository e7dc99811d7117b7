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

`model` is any family's validated config (megadiff.models.family); .model_shape reads its sizes.
"""

from dataclasses import dataclass
from functools import lru_cache

from megadiff.platform.parallel_layout import ParallelLayout

from .model_shape import model_shape


@dataclass(frozen=True)
class ParamTensor:
    name: str
    numel: int
    expert: bool = False  # a routed-expert weight (expert-parallel when ep > 1)
    trainable: bool = True  # False: frozen base weight under LoRA (no gradient, no optimizer state)


def chunk_layers(model, layout: ParallelLayout, pp_rank: int, vp: int = 0) -> range:
    """Global layer numbers (0-based) of virtual chunk `vp` on pipeline rank `pp_rank`
    (megatron-core's even split: chunk vp holds the vp-th slice of every rank's share)."""
    vpp = layout.vpp or 1
    per_chunk = model.num_hidden_layers // (layout.pp * vpp)
    start = vp * (model.num_hidden_layers // vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


def _attention(m, layout, prefix):
    h, d, tp = m.hidden, m.head_dim, layout.tp
    nq, nkv = m.heads, m.kv_heads
    out = [
        ParamTensor(f"{prefix}.input_layernorm.weight", h),
        ParamTensor(f"{prefix}.self_attention.linear_proj.weight", h * nq * d // tp),
        ParamTensor(f"{prefix}.self_attention.linear_qkv.weight", (nq + 2 * nkv) * d // tp * h),
    ]
    if m.qk_norm:
        out += [
            ParamTensor(f"{prefix}.self_attention.q_layernorm.weight", d),
            ParamTensor(f"{prefix}.self_attention.k_layernorm.weight", d),
        ]
    return out + [ParamTensor(f"{prefix}.pre_mlp_layernorm.weight", h)]


def _mlp(m, layout, prefix, layer):
    h, tp = m.hidden, layout.tp
    if not m.is_moe(layer):
        i = m.ffn
        return [
            ParamTensor(f"{prefix}.mlp.linear_fc1.weight", 2 * i // tp * h),
            ParamTensor(f"{prefix}.mlp.linear_fc2.weight", h * i // tp),
        ]
    fm, etp = m.expert_ffn, layout.etp
    out = [ParamTensor(f"{prefix}.mlp.router.weight", m.experts * h)]
    for e in range(m.experts // layout.ep):
        out += [
            ParamTensor(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc1.weight", 2 * fm // etp * h, expert=True),
            ParamTensor(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc2.weight", h * fm // etp, expert=True),
        ]
    fs = m.shared_ffn
    if fs:
        out += [
            ParamTensor(f"{prefix}.mlp.shared_experts.linear_fc1.weight", 2 * fs // tp * h),
            ParamTensor(f"{prefix}.mlp.shared_experts.linear_fc2.weight", h * fs // tp),
        ]
    return out


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # megatron names (the lora section's)


def _lora(m, layout, base: list[ParamTensor], rank: int, targets, experts: bool) -> list[ParamTensor]:
    """LoRA adapters A [r, in] and B [out, r] on the `targets` linears of the attention, the dense
    layer's MLP and the shared expert, and with `experts` on every routed expert; the router stays
    frozen. Split as megatron-core splits the base linear (Megatron-Bridge's rule): column-parallel
    base: A replicated, B [out/tp, r]; row-parallel base: A [r, in/tp], B replicated; routed experts
    split by etp instead of tp and held by their EP rank (expert-parallel parameters)."""
    h, d = m.hidden, m.head_dim
    nq, nkv = m.heads, m.kv_heads
    ffn = {  # module holding linear_fc1/linear_fc2 -> its intermediate size
        "mlp": m.ffn,
        "mlp.shared_experts": m.shared_ffn,
    }
    out = []
    for p in base:
        stem = p.name.removesuffix(".weight")
        owner, _, leaf = stem.rpartition(".")
        if leaf not in targets:
            continue
        routed = ".mlp.experts.local_experts." in stem
        if routed and not experts:
            continue
        if leaf == "linear_qkv":
            n_in, n_out, column = h, (nq + 2 * nkv) * d, True
        elif leaf == "linear_proj":
            n_in, n_out, column = nq * d, h, False
        else:
            kind = next((k for k in ffn if owner.endswith("." + k)), None)
            size = m.expert_ffn if routed else ffn.get(kind)
            if size is None:
                continue
            n_in, n_out, column = (h, 2 * size, True) if leaf == "linear_fc1" else (size, h, False)
        split = layout.etp if routed else layout.tp
        a, b = (rank * n_in, n_out // split * rank) if column else (rank * n_in // split, n_out * rank)
        out += [
            ParamTensor(f"{stem}.lora_A.weight", a, expert=routed),
            ParamTensor(f"{stem}.lora_B.weight", b, expert=routed),
        ]
    return out


@lru_cache(maxsize=4096)  # the planner asks for the same rank many times (memory, step time, dp ranks)
def rank_parameters(
    model,
    layout: ParallelLayout,
    pp_rank: int,
    vp: int = 0,
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
    lora_experts: bool = False,
) -> tuple[ParamTensor, ...]:
    """The parameters of virtual chunk `vp` on pipeline rank `pp_rank`, in registration order.
    With `lora_rank`, base weights are frozen and the adapters (`_lora`) come after them."""
    vpp = layout.vpp or 1
    first = pp_rank == 0 and vp == 0
    last = pp_rank == layout.pp - 1 and vp == vpp - 1
    m = model_shape(model)
    v, h, tp = m.vocab, m.hidden, layout.tp
    out = [ParamTensor("embedding.word_embeddings.weight", v // tp * h)] if first else []
    for layer in chunk_layers(model, layout, pp_rank, vp):
        prefix = f"decoder.layers.{layer}"
        out += _attention(m, layout, prefix) + _mlp(m, layout, prefix, layer)
    if last:
        out += [ParamTensor("decoder.final_layernorm.weight", h), ParamTensor("output_layer.weight", v // tp * h)]
    if lora_rank:
        adapters = _lora(m, layout, out, lora_rank, lora_targets, lora_experts)
        out = [ParamTensor(p.name, p.numel, p.expert, trainable=False) for p in out] + adapters
    return tuple(out)


def total_params(model) -> int:
    """Every parameter of the model (one copy: the layout (1, 1, 1))."""
    return sum(p.numel for p in rank_parameters(model, ParallelLayout(), 0))


def active_params(model) -> int:
    """Parameters one token passes through: everything but the routed experts, plus top-k of E of them."""
    params = rank_parameters(model, ParallelLayout(), 0)
    routed = sum(p.numel for p in params if p.expert)
    dense = sum(p.numel for p in params if not p.expert)
    m = model_shape(model)
    return dense + (routed * m.top_k // m.experts if m.experts else 0)
