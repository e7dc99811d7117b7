"""Per-GPU memory forecast of a megadiff training run: weights, gradients, optimizer state,
activations and buffers, per pipeline rank.

Weights, gradients, optimizer state: what megatron-core allocates, reproduced exactly for the
gradient-buffer layout megadiff uses (megatron-core DDP, `grad_reduce_in_fp32`, no
`overlap_grad_reduce`, hence one bucket per buffer and chunk):
- one buffer per model chunk for the dense parameters (sharded over the data-parallel group with
  the context-parallel ranks, size dp*cp = world / (tp * pp)) and, when ep > 1, one for the routed
  experts (expert-data-parallel group, edp = world / (pp * ep * etp), CP ranks included);
- with the distributed optimizer every parameter starts at a multiple of 64 elements and the bucket
  is padded to a multiple of lcm(group size, 128); the parameters then live in that padded buffer,
  in the param dtype; the fp32 gradients likewise;
- Adam state (exp_avg, exp_avg_sq: fp32) and, for bf16 parameters, an fp32 master copy: only for the
  part of each parameter inside this rank's 1/group-size slice of the bucket (distributed optimizer),
  or for every parameter (without it).

Activations: `activation_bytes_per_layer` (the model is written down in docs/planner.md and checked
against the saved tensors of the CPU tiny model in tests/planner); buffers: model buffers (expert
bias), CUDA context + communication buffers, and a fragmentation margin (assumptions, see
`Hardware`).
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache

from megadiff.platform.parallel_layout import ParallelLayout

from .model_shape import model_shape
from .params import LORA_TARGETS, ParamTensor, chunk_layers, rank_parameters

GiB = 1024**3
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class RunShape:
    """What the run feeds the model and how it trains it (everything but the layout)."""

    seq_len: int  # S: tokens per packed row; block diffusion feeds 2S
    micro_batch_size: int = 1
    global_batch_size: int = 8
    mode: str = "bd"  # "bd" (block diffusion, [x_t ; x_0]) or "full"
    dtype: str = "bf16"  # "bf16" or "fp32": parameter / activation dtype
    attention_backend: str = "flex"  # "dense" (bool mask, [b, h, s, s] scores) or "flex"
    recompute: str = "none"  # "none", "selective" (recompute_modules) or "full" (every layer)
    recompute_modules: tuple[str, ...] = ("core_attn",)  # selective: megatron-core's modules (its default)
    fp8: bool = False
    lora_rank: int | None = None  # LoRA: frozen base, adapters of this rank on lora_targets (+ routed experts)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_experts: bool = False
    use_distributed_optimizer: bool = True

    @property
    def lora(self) -> tuple:
        """The LoRA arguments of rank_parameters."""
        return self.lora_rank, tuple(self.lora_targets), self.lora_experts

    @property
    def tokens(self) -> int:
        """Tokens per row as the model sees them."""
        return 2 * self.seq_len if self.mode == "bd" else self.seq_len

    @property
    def act_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


@dataclass(frozen=True)
class Hardware:
    """The machine, and the assumptions about it the forecast and the ranking use."""

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gb: float = 80.0  # GB as GPU vendors write it (80 GB H100 = 79.6 GiB usable)
    context_gib: float = 2.0  # CUDA context, NCCL/gloo communicators and their buffers
    fragmentation: float = 0.05  # caching-allocator margin on top of everything else
    tflops: float = 400.0  # achieved bf16 TFLOP/s per GPU (~40% of an H100's dense peak)
    intra_node_gbps: float = 150.0  # achieved NVLink bandwidth per GPU in collectives, GB/s
    inter_node_gbps: float = 20.0  # achieved InfiniBand bandwidth per GPU (a 200 Gb/s NIC per GPU)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory_bytes(self) -> float:
        return self.gpu_memory_gb * 1e9


@dataclass
class MemorySplit:
    """Bytes on one GPU."""

    weights: int = 0
    grads: int = 0
    optimizer_dense: int = 0
    optimizer_expert: int = 0
    activations: int = 0
    buffers: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def optimizer(self) -> int:
        return self.optimizer_dense + self.optimizer_expert

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    def as_gib(self) -> dict:
        keys = ("weights", "grads", "optimizer_dense", "optimizer_expert", "activations", "buffers", "total")
        return {k: round(getattr(self, k) / GiB, 3) for k in keys}


def group_sizes(layout: ParallelLayout, world: int) -> tuple[int, int]:
    """(dp*cp, edp): the groups megatron-core reduces and shards dense and expert gradients over
    (the data-parallel group with the context-parallel ranks; the expert-data-parallel group)."""
    return world // (layout.tp * layout.pp), world // (layout.pp * layout.ep * layout.etp)


def data_parallel_size(layout: ParallelLayout, world: int) -> int:
    """dp: the ranks that read different rows (the CP ranks of one split the same rows)."""
    return world // (layout.tp * layout.cp * layout.pp)


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


@lru_cache(maxsize=4096)
def buffer_shard(params: tuple[ParamTensor, ...], group: int, distributed: bool, rank: int) -> tuple[int, int, int]:
    """megatron-core's _ParamAndGradBuffer for `params` (one bucket): returns (buffer numel, this
    rank's optimizer elements of dense params, ... of expert params). Without the distributed
    optimizer there is no padding and every rank holds every parameter's state."""
    index, spans = 0, []
    for p in reversed(params):  # megatron-core lays params out in reverse (backprop) order
        if distributed:
            index = _pad(index, 64)
        spans.append((index, index + p.numel, p.expert))
        index += p.numel
    if not distributed:
        return index, sum(p.numel for p in params if not p.expert), sum(p.numel for p in params if p.expert)
    numel = _pad(index, math.lcm(group, 128)) if params else 0
    lo, hi = rank * numel // group, (rank + 1) * numel // group
    mine = {False: 0, True: 0}
    for start, end, expert in spans:
        mine[expert] += max(0, min(end, hi) - max(start, lo))
    return numel, mine[False], mine[True]


def state_bytes(
    model,
    layout: ParallelLayout,
    world: int,
    shape: RunShape,
    pp_rank: int,
    dp_rank: int = 0,
    edp_rank: int = 0,
) -> MemorySplit:
    """Weights, gradients and optimizer state of one rank (exact for megadiff's DDP settings)."""
    dp, edp = group_sizes(layout, world)
    p_bytes = 4 if shape.dtype == "fp32" else 2
    opt_per_elem = 8 + (4 if p_bytes == 2 else 0)  # Adam moments (+ fp32 master of bf16 params)
    split = MemorySplit()
    distributed = shape.use_distributed_optimizer
    for vp in range(layout.vpp or 1):
        params = rank_parameters(model, layout, pp_rank, vp, *shape.lora)
        frozen = [p for p in params if not p.trainable]
        trainable = [p for p in params if p.trainable]
        split.weights += sum(p.numel for p in frozen) * p_bytes
        expert_parallel = layout.ep > 1
        groups = [
            (tuple(p for p in trainable if not (p.expert and expert_parallel)), dp, dp_rank),
            (tuple(p for p in trainable if p.expert and expert_parallel), edp, edp_rank),
        ]
        for members, size, rank in groups:
            if not members:
                continue
            numel, dense_elems, expert_elems = buffer_shard(members, size, distributed, rank)
            split.weights += numel * p_bytes if distributed else sum(p.numel for p in members) * p_bytes
            split.grads += numel * 4  # grad_reduce_in_fp32
            split.optimizer_dense += dense_elems * opt_per_elem
            split.optimizer_expert += expert_elems * opt_per_elem
        if shape.fp8:  # TE keeps an fp8 copy (and transpose) of every linear weight it runs
            split.weights += sum(p.numel for p in params if "linear" in p.name or "experts" in p.name) * 2
    return split


# ---- activations ---------------------------------------------------------------------------------


def activation_bytes_per_layer(model, layout: ParallelLayout, shape: RunShape, moe: bool) -> dict:
    """Bytes saved for backward by one transformer layer for one micro-batch on one rank, by part.

    Tokens per rank t = b * s / (tp * cp) (context parallelism splits the sequence over cp, sequence
    parallelism shards everything outside attention by tp; inside, heads are split by tp). Per
    token, in elements of the activation dtype a:
    - each RMSNorm: its input, the normalised input, the scaled output (3h) + fp32 rstd;
    - attention: qkv output (nq+2nkv)d/tp, q/k-norm inputs and outputs (if the model has QK-norm), RoPE cos/sin,
      dense: q, GQA-expanded k and v (3 nq d/tp) + softmax probabilities nq/tp * s (fp32 softmax
      and its bf16 copy with bf16) + the bool mask (b s^2, once per micro-batch, not per layer);
      flex: q, k, v, output and fp32 log-sum-exp (nq/tp); with cp > 1, k and v are the whole
      sequence's, gathered over the CP group (cp times the local tokens' 2 nkv d/tp);
      then the output projection's input nq d/tp;
    - dense MLP: fc1 output 2I/tp, SiLU output, gate*up, fc2 input (3 I/tp);
    - MoE: router logits/scores (fp32, E), top-k indices (int64), the permuted tokens k*h, per
      routed token fc1 output 2Fm/etp + 3 Fm/etp, the shared expert like the dense MLP with Fs.
    Recompute "full" keeps only the layer input (h); "selective" drops the terms of the recomputed
    modules (megatron-core's recompute_modules): core_attn the attention core's, mlp / moe the dense
    MLP's / the whole MoE layer's (its input h is kept), shared_experts the shared expert's.
    fp8 saves linear inputs in 1 byte (first order: half of the non-attention terms)."""
    m = model_shape(model)
    h, d, tp, a = m.hidden, m.head_dim, layout.tp, shape.act_bytes
    nq, nkv = m.heads, m.kv_heads
    b, s, cp = shape.micro_batch_size, shape.tokens, layout.cp
    t = b * s / (tp * cp)
    if shape.recompute == "full":
        return {"layer_input": t * h * a}
    norm = 3 * h * a + 4
    qk_norm = 2 * (nq + nkv) * d if m.qk_norm else 0  # the norms' inputs and outputs, and fp32 rstd
    qk = ((nq + 2 * nkv) * d + qk_norm) / tp * a + (nq + nkv) / tp * 4 * m.qk_norm + 2 * m.rotary_dim * a
    if shape.attention_backend == "dense":
        core = 3 * nq * d / tp * a + nq / tp * s * (a + (4 if a == 2 else 0))
    else:
        core = (nq + 2 * nkv * cp + nq) * d / tp * a + nq / tp * 4
    recomputed = set(shape.recompute_modules) if shape.recompute == "selective" else set()
    if "core_attn" in recomputed:
        core = 0.0
    parts = {"attention": t * (norm + qk + nq * d / tp * a), "core_attention": t * core}
    if not moe:
        mlp = norm + (h * a if "mlp" in recomputed else 5 * m.ffn / tp * a)
    elif "moe" in recomputed:
        mlp = norm + h * a
    else:
        k, e, fm = m.top_k, m.experts, m.expert_ffn
        fs = m.shared_ffn
        etp = layout.etp
        router = 2 * e * 4 + k * 8 * 2 + e
        routed = k * (h + 5 * fm / etp) * a * etp  # tokens gathered over etp, hidden split by etp
        mlp = norm + router + routed + (0 if "shared_experts" in recomputed else 5 * fs / tp * a)
    if shape.fp8:
        mlp *= 0.5
        parts["attention"] *= 0.5
    parts["mlp"] = t * mlp
    return parts


def in_flight_microbatches(layout: ParallelLayout, microbatches: int) -> float:
    """Micro-batches (in units of one pipeline rank's layers) whose activations pipeline rank 0
    holds at its peak: 1F1B warm-up holds pp; interleaving holds (pp-1)*2 + (vpp-1)*pp + 1 chunks of
    L/(pp*vpp) layers (megatron-core's schedule), i.e. that many / vpp rank-shares."""
    if layout.pp == 1:
        return 1.0
    if not layout.vpp:
        return float(min(layout.pp, microbatches))
    chunks = min(microbatches * layout.vpp, (layout.pp - 1) * 2 + (layout.vpp - 1) * layout.pp + 1)
    return chunks / layout.vpp


def microbatches_per_step(layout: ParallelLayout, world: int, shape: RunShape) -> int:
    dp = data_parallel_size(layout, world)
    return max(1, shape.global_batch_size // (dp * shape.micro_batch_size))


def activation_bytes(model, layout: ParallelLayout, world: int, shape: RunShape, pp_rank: int) -> dict:
    """Peak activation bytes of pipeline rank `pp_rank`: its layers x micro-batches in flight,
    the dense mask, the embedding output, and (last stage) logits + the loss's fp32 copy."""
    m = microbatches_per_step(layout, world, shape)
    flight = (
        in_flight_microbatches(layout, m) if pp_rank == 0 else max(1.0, in_flight_microbatches(layout, m) - pp_rank)
    )
    layers = [i for vp in range(layout.vpp or 1) for i in chunk_layers(model, layout, pp_rank, vp)]
    per_layer = 0.0
    for i in layers:
        per_layer += sum(activation_bytes_per_layer(model, layout, shape, model_shape(model).is_moe(i)).values())
    b, s, a, tp = shape.micro_batch_size, shape.tokens, shape.act_bytes, layout.tp
    local = s / layout.cp  # this rank's tokens of a row (context parallelism splits it)
    out = {"layers": per_layer * flight}  # per_layer: all of this rank's layers, one micro-batch
    if shape.attention_backend == "dense":
        out["dense_mask"] = b * s * s * flight  # bool [b, 1, s, s], shared by the layers of a micro-batch
    out["embedding"] = b * local * model_shape(model).hidden / tp * a * flight if pp_rank == 0 else 0
    if pp_rank == layout.pp - 1:
        loss_tokens = shape.seq_len / layout.cp  # logits of x_t only enter the loss
        v = model_shape(model).vocab
        out["logits"] = b * local * v / tp * a + 2 * b * loss_tokens * v / tp * 4
    return out


def forecast(model, layout: ParallelLayout, hw: Hardware, shape: RunShape, pp_rank: int | None = None) -> MemorySplit:
    """The memory of the fullest rank (or of `pp_rank`): the worst pipeline stage, and within it
    the data-parallel rank with the largest optimizer shard."""
    world = hw.world
    # A middle stage holds the layers of the first without its embedding and with fewer micro-batches
    # in flight, so the first and the last stage are the candidates for the fullest rank.
    ranks = sorted({0, layout.pp - 1}) if pp_rank is None else [pp_rank]
    best = None
    for r in ranks:
        split = state_bytes(model, layout, world, shape, r)  # rank 0 of the DP group holds the most
        acts = activation_bytes(model, layout, world, shape, r)
        split.activations = int(sum(acts.values()))
        m = model_shape(model)  # the routers' fp32 expert bias and token counts
        model_buffers = 2 * m.experts * 4 * m.moe_layers // layout.pp if m.expert_bias else 0
        base = split.weights + split.grads + split.optimizer + split.activations + model_buffers
        split.buffers = int(model_buffers + hw.context_gib * GiB + hw.fragmentation * base)
        split.detail = {"activations": {k: round(v / GiB, 3) for k, v in acts.items()}, "pp_rank": r}
        if best is None or split.total > best.total:
            best = split
    return best
