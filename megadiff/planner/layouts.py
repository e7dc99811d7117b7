"""Every layout of a run on a cluster, checked and ranked by a first-order step-time model.

Step time (a ranking, not a promise; assumptions in `Hardware` and docs/planner.md):
  compute = 6 * (active matmul params per token) * tokens + attention FLOPs, x4/3 with full
            recompute (one more forward), plus the recomputed modules' forward with selective
            recompute, divided over all GPUs at `Hardware.tflops`
            (x1.5 with fp8); flex skips masked tiles (block diffusion sees ~1/4 of [2S x 2S]),
            dense computes all of them;
  tp      = sequence-parallel all-gathers / reduce-scatters: 4 per layer forward and 4 backward,
            each moving (tp-1)/tp of b*s/cp*h activations, on NVLink if tp fits a node;
  cp      = context parallelism: per layer the K/V all-gather forward and the reduce-scatter of
            their gradients backward, each (cp-1)/cp of b*s*2*nkv*d/tp, on NVLink if tp*cp fits a
            node (megatron-core orders ranks tp-cp-ep-dp-pp); the zig-zag split balances the
            attention work (megadiff.models.common.context_parallel), so compute is not skewed;
  ep      = all-to-all dispatch + combine, forward and backward, of k*b*s/(tp*cp)*h per MoE layer,
            (ep-1)/ep of it leaves the GPU; NVLink if etp*ep fits a node (megatron-core orders
            expert ranks etp-ep-dp-pp), else InfiniBand;
  dp      = gradient reduce-scatter + parameter all-gather (fp32 grads) once per step, not
            overlapped (megadiff does not overlap them yet);
  bubble  = (pp-1) / (vpp * micro-batches) on top of compute + tp + cp + ep.
"""

from dataclasses import asdict, dataclass, field, replace

from megadiff.errors import ConfigError
from megadiff.platform.parallel_layout import ParallelLayout, sequence_multiple

from .memory import (
    GiB,
    Hardware,
    MemorySplit,
    RunShape,
    data_parallel_size,
    forecast,
    group_sizes,
    microbatches_per_step,
)
from .model_shape import model_shape
from .params import active_params, rank_parameters, total_params


@dataclass
class Plan:
    layout: ParallelLayout
    dp: int  # data-parallel size: ranks reading different rows (world / (tp * cp * pp))
    use_distributed_optimizer: bool
    memory: MemorySplit | None = None
    step_seconds: float | None = None
    step_parts: dict = field(default_factory=dict)
    reason: str | None = None  # why it does not run / fit; None = feasible
    recompute: tuple[str, tuple[str, ...]] | None = None  # (granularity, modules) the search chose; None: the shape's

    def overrides(self) -> list[str]:
        lay = self.layout
        out = [f"parallel.tp={lay.tp}", f"parallel.ep={lay.ep}", f"parallel.etp={lay.etp}", f"parallel.pp={lay.pp}"]
        out.append(f"parallel.vpp={lay.vpp if lay.vpp else 'null'}")
        out.append(f"parallel.cp={lay.cp}")
        out.append(f"parallel.use_distributed_optimizer={str(self.use_distributed_optimizer).lower()}")
        if self.recompute is not None:
            granularity, modules = self.recompute
            out.append(f"perf.recompute_granularity={granularity}")
            if granularity == "selective":
                out.append(f"perf.recompute_modules=[{','.join(modules)}]")
        return out

    def command(self, config: str = "CONFIG.yaml") -> str:
        return " ".join(["examples/pretrain_llada2_sft.sh", config, *self.overrides()])

    def to_dict(self, config: str = "CONFIG.yaml") -> dict:
        return {
            "layout": {
                **asdict(self.layout),
                "dp": self.dp,
                "use_distributed_optimizer": self.use_distributed_optimizer,
            },
            "feasible": self.reason is None,
            "reason": self.reason,
            "memory_gib": self.memory.as_gib() if self.memory else None,
            "memory_detail": self.memory.detail if self.memory else None,
            "step_seconds": self.step_seconds,
            "step_parts": self.step_parts,
            "recompute": None
            if self.recompute is None
            else {"granularity": self.recompute[0], "modules": self.recompute[1]},
            "command": self.command(config),
        }


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_layouts(model, world: int) -> list[ParallelLayout]:
    """tp, cp, ep, etp, pp, vpp combinations whose group sizes multiply into `world` (model
    divisibility is checked later, so those layouts are reported with the reason)."""
    out = []
    for pp in _divisors(world, world):
        for tp in _divisors(world // pp, world // pp):
            for cp in _divisors(world // (pp * tp), world // (pp * tp)):
                for ep in _divisors(world // pp, world // pp):
                    for etp in sorted({1, tp}) if ep > 1 else [tp]:
                        if (world // pp) % (ep * etp):
                            continue
                        for vpp in [None, 2, 4] if pp > 1 else [None]:
                            out.append(ParallelLayout(tp=tp, ep=ep, etp=etp, pp=pp, vpp=vpp, cp=cp))
    return out


def step_time(model, layout: ParallelLayout, hw: Hardware, shape: RunShape) -> dict:
    """Seconds per optimizer step by part (see the module docstring)."""
    world, (dp, edp) = hw.world, group_sizes(layout, hw.world)  # gradient groups (dp*cp, edp)
    m = model_shape(model)
    s, b, h, a = shape.tokens, shape.micro_batch_size, m.hidden, shape.act_bytes
    cp = layout.cp
    rows = shape.global_batch_size
    tokens = rows * s
    embed = 2 * m.vocab * h
    matmul_active = active_params(model) - embed + m.vocab * h  # the lm head is a matmul
    visible = 1.0 if shape.attention_backend == "dense" else (0.25 if shape.mode == "bd" else 1.0)
    attn = 4 * s * m.heads * m.head_dim * m.layers * visible  # per token, fwd
    flops = 3 * (2 * matmul_active + attn) * tokens
    if shape.recompute == "full":
        flops *= 4 / 3
    elif shape.recompute == "selective":
        flops += recomputed_forward_flops(model, shape, attn) * tokens
    compute = flops / world / (hw.tflops * 1e12 * (1.5 if shape.fp8 else 1.0))

    def bandwidth(span: int) -> float:
        return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9

    micro = microbatches_per_step(layout, world, shape)
    layers_here = m.layers // layout.pp
    moe_here = m.moe_layers / layout.pp
    tp_comm = 0.0
    if layout.tp > 1:
        volume = 8 * layers_here * micro * b * s / cp * h * a * (layout.tp - 1) / layout.tp
        tp_comm = volume / bandwidth(layout.tp)
    cp_comm = 0.0
    if cp > 1:
        kv = b * s * 2 * m.kv_heads * m.head_dim / layout.tp * a  # the whole row's K and V
        cp_comm = 2 * layers_here * micro * kv * (cp - 1) / cp / bandwidth(layout.tp * cp)
    ep_comm = 0.0
    if layout.ep > 1:
        volume = 4 * moe_here * micro * m.top_k * b * s / (layout.tp * cp) * h * a
        ep_comm = volume * (layout.ep - 1) / layout.ep / bandwidth(layout.etp * layout.ep)
        if "moe" in recomputed_modules(shape):  # dispatch and combine run again in the recompute
            ep_comm *= 1.5
    params = [p for vp in range(layout.vpp or 1) for p in rank_parameters(model, layout, 0, vp, *shape.lora)]
    trainable = [p for p in params if p.trainable]
    dense = sum(p.numel for p in trainable if not (p.expert and layout.ep > 1))
    expert = sum(p.numel for p in trainable if p.expert and layout.ep > 1)
    dp_comm = 0.0
    for n, group, span in ((dense, dp, layout.tp * dp), (expert, edp, layout.tp * dp)):
        if group > 1 and n:
            dp_comm += 2 * n * 4 * (group - 1) / group / bandwidth(span)
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * micro)
    total = (compute + tp_comm + cp_comm + ep_comm) * (1 + bubble) + dp_comm
    return {
        "compute": compute,
        "tp_comm": tp_comm,
        "cp_comm": cp_comm,
        "ep_comm": ep_comm,
        "dp_comm": dp_comm,
        "bubble_fraction": bubble,
        "total": total,
    }


def recomputed_modules(shape: RunShape) -> set[str]:
    return set(shape.recompute_modules) if shape.recompute == "selective" else set()


def recomputed_forward_flops(model, shape: RunShape, attn: float) -> float:
    """Forward FLOPs per token that selective recompute runs again (`attn`: the attention core's)."""
    m = model_shape(model)
    modules, h = recomputed_modules(shape), m.hidden
    dense_layers, moe_layers = m.dense_layers, m.moe_layers
    per_moe = h * m.experts + 3 * h * (m.top_k * m.expert_ffn + m.shared_ffn)
    flops = attn if "core_attn" in modules else 0.0
    flops += 2 * 3 * h * m.ffn * dense_layers if "mlp" in modules else 0.0
    flops += 2 * per_moe * moe_layers if "moe" in modules else 0.0
    return flops


def recomputes_core_attention(shape: RunShape) -> bool:
    return shape.recompute == "full" or "core_attn" in recomputed_modules(shape)


def why_not_runnable(model, layout: ParallelLayout, hw: Hardware, shape: RunShape, dp: int):
    """The reason megadiff refuses this layout before memory matters, or None."""
    try:
        model.validate_layout(layout)
    except ConfigError as e:
        return str(e).split(": ", 1)[-1]
    if shape.global_batch_size % (dp * shape.micro_batch_size):
        return (
            f"global_batch_size={shape.global_batch_size} is not a multiple of dp*micro_batch_size="
            f"{dp}*{shape.micro_batch_size}"
        )
    if shape.attention_backend == "flex" and recomputes_core_attention(shape):
        return (
            "flex attention with core-attention recompute is refused (megatron-core's checkpoint cannot save a "
            "BlockMask); recompute selectively without core_attn"
        )
    if layout.cp > 1:
        if shape.attention_backend != "flex":
            return f"cp={layout.cp} needs flex attention (dense masks cannot be split over CP ranks)"
        multiple = sequence_multiple(layout.cp, layout.tp)
        if shape.seq_len % multiple:
            return f"seq_len={shape.seq_len} is not a multiple of lcm(2*cp, cp*tp)={multiple}"
    return None


# recompute="auto": the search tries these in order and keeps the first that fits (flex attention
# cannot recompute core attention, so its selective option recomputes the MLPs and MoE layers).
AUTO_RECOMPUTE = (("none", ()), ("selective", ("mlp", "moe")), ("full", ()))


def plan_layouts(model, hw: Hardware, shape: RunShape, layouts=None, distributed=(True, False)):
    """All plans, feasible ones first (fastest first), then the rest with their reasons.
    shape.recompute == "auto": per layout the first of AUTO_RECOMPUTE that runs and fits (the plan
    names it; a layout that fits with none names the smallest attempt in its reason)."""
    plans = []
    for layout in layouts if layouts is not None else candidate_layouts(model, hw.world):
        dp_cp, edp = group_sizes(layout, hw.world)
        dp = data_parallel_size(layout, hw.world)
        # With no data (or context) parallelism there is nothing to shard: one plan (distributed optimizer on).
        for dist in distributed if max(dp_cp, edp) > 1 else distributed[:1]:
            plans.append(_plan(model, hw, shape, layout, dp, dist))
    plans.sort(key=lambda p: (p.reason is not None, p.step_seconds or 0.0))
    return plans


def _plan(model, hw: Hardware, shape: RunShape, layout: ParallelLayout, dp: int, dist: bool) -> Plan:
    """The plan of one layout (the first fitting recompute option with recompute="auto")."""
    auto = shape.recompute == "auto"
    options = AUTO_RECOMPUTE if auto else ((shape.recompute, shape.recompute_modules),)
    best = None
    for granularity, modules in options:
        run = RunShape(**{**asdict(shape), "use_distributed_optimizer": dist, "recompute": granularity})
        if auto:
            run = replace(run, recompute_modules=modules)
        plan = Plan(layout, dp, dist, recompute=(granularity, modules) if auto else None)
        plan.reason = why_not_runnable(model, layout, hw, run, dp)
        if plan.reason is None:
            plan.memory = forecast(model, layout, hw, run)
            plan.step_parts = step_time(model, layout, hw, run)
            plan.step_seconds = plan.step_parts["total"]
            if plan.memory.total > hw.memory_bytes:
                plan.reason = (
                    f"needs {plan.memory.total / GiB:.1f} GiB per GPU (pipeline rank "
                    f"{plan.memory.detail['pp_rank']}), more than {hw.memory_bytes / GiB:.1f} GiB"
                    + (f" (recompute {granularity}{' ' + ','.join(modules) if modules else ''})" if auto else "")
                )
        if plan.reason is None:
            return plan
        if best is None or (plan.memory and (best.memory is None or plan.memory.total < best.memory.total)):
            best = plan
    return best


def model_summary(model) -> dict:
    return {"total_params": total_params(model), "active_params": active_params(model)}
