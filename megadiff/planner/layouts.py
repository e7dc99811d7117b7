"""Every layout of a run on a cluster, checked and ranked by a first-order step-time model.

Step time (a ranking, not a promise; assumptions in `Hardware` and docs/planner.md):
  compute = 6 * (active matmul params per token) * tokens + attention FLOPs, x4/3 with full
            recompute (one more forward), divided over all GPUs at `Hardware.tflops`
            (x1.5 with fp8); flex skips masked tiles (block diffusion sees ~1/4 of [2S x 2S]),
            dense computes all of them;
  tp      = sequence-parallel all-gathers / reduce-scatters: 4 per layer forward and 4 backward,
            each moving (tp-1)/tp of b*s*h activations, on NVLink if tp fits a node;
  ep      = all-to-all dispatch + combine, forward and backward, of k*b*s/tp*h per MoE layer,
            (ep-1)/ep of it leaves the GPU; NVLink if etp*ep fits a node (megatron-core orders
            expert ranks etp-ep-dp-pp), else InfiniBand;
  dp      = gradient reduce-scatter + parameter all-gather (fp32 grads) once per step, not
            overlapped (megadiff does not overlap them yet);
  bubble  = (pp-1) / (vpp * micro-batches) on top of compute + tp + ep.
"""

from dataclasses import asdict, dataclass, field

from megadiff.models.llada2.config import ConfigError, LLaDA2ModelConfig, ParallelLayout

from .memory import GiB, Hardware, MemorySplit, RunShape, forecast, group_sizes, microbatches_per_step
from .params import active_params, rank_parameters, total_params


@dataclass
class Plan:
    layout: ParallelLayout
    dp: int
    use_distributed_optimizer: bool
    memory: MemorySplit | None = None
    step_seconds: float | None = None
    step_parts: dict = field(default_factory=dict)
    reason: str | None = None  # why it does not run / fit; None = feasible

    def overrides(self) -> list[str]:
        lay = self.layout
        out = [f"parallel.tp={lay.tp}", f"parallel.ep={lay.ep}", f"parallel.etp={lay.etp}", f"parallel.pp={lay.pp}"]
        out.append(f"parallel.vpp={lay.vpp if lay.vpp else 'null'}")
        return out + [f"parallel.use_distributed_optimizer={str(self.use_distributed_optimizer).lower()}"]

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
            "command": self.command(config),
        }


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_layouts(model: LLaDA2ModelConfig, world: int) -> list[ParallelLayout]:
    """tp, ep, etp, pp, vpp combinations whose group sizes multiply into `world` (model
    divisibility is checked later, so those layouts are reported with the reason)."""
    out = []
    for pp in _divisors(world, world):
        for tp in _divisors(world // pp, world // pp):
            for ep in _divisors(world // pp, world // pp):
                for etp in sorted({1, tp}) if ep > 1 else [tp]:
                    if (world // pp) % (ep * etp):
                        continue
                    for vpp in [None, 2, 4] if pp > 1 else [None]:
                        out.append(ParallelLayout(tp=tp, ep=ep, etp=etp, pp=pp, vpp=vpp))
    return out


def step_time(model: LLaDA2ModelConfig, layout: ParallelLayout, hw: Hardware, shape: RunShape) -> dict:
    """Seconds per optimizer step by part (see the module docstring)."""
    world, (dp, edp) = hw.world, group_sizes(layout, hw.world)
    s, b, h, a = shape.tokens, shape.micro_batch_size, model.hidden_size, shape.act_bytes
    rows = shape.global_batch_size
    tokens = rows * s
    embed = 2 * model.vocab_size * h
    matmul_active = active_params(model) - embed + model.vocab_size * h  # the lm head is a matmul
    visible = 1.0 if shape.attention_backend == "dense" else (0.25 if shape.mode == "bd" else 1.0)
    attn = 4 * s * model.num_attention_heads * model.head_dim * model.num_hidden_layers * visible  # per token, fwd
    flops = 3 * (2 * matmul_active + attn) * tokens
    if shape.recompute == "full":
        flops *= 4 / 3
    elif shape.recompute == "selective":
        flops += attn * tokens
    compute = flops / world / (hw.tflops * 1e12 * (1.5 if shape.fp8 else 1.0))

    def bandwidth(span: int) -> float:
        return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9

    micro = microbatches_per_step(layout, world, shape)
    layers_here = model.num_hidden_layers // layout.pp
    moe_here = (model.num_hidden_layers - model.first_k_dense_replace) / layout.pp
    tp_comm = 0.0
    if layout.tp > 1:
        volume = 8 * layers_here * micro * b * s * h * a * (layout.tp - 1) / layout.tp
        tp_comm = volume / bandwidth(layout.tp)
    ep_comm = 0.0
    if layout.ep > 1:
        volume = 4 * moe_here * micro * model.num_experts_per_tok * b * s / layout.tp * h * a
        ep_comm = volume * (layout.ep - 1) / layout.ep / bandwidth(layout.etp * layout.ep)
    params = [p for vp in range(layout.vpp or 1) for p in rank_parameters(model, layout, 0, vp, *shape.lora)]
    trainable = [p for p in params if p.trainable]
    dense = sum(p.numel for p in trainable if not (p.expert and layout.ep > 1))
    expert = sum(p.numel for p in trainable if p.expert and layout.ep > 1)
    dp_comm = 0.0
    for n, group, span in ((dense, dp, layout.tp * dp), (expert, edp, layout.tp * dp)):
        if group > 1 and n:
            dp_comm += 2 * n * 4 * (group - 1) / group / bandwidth(span)
    bubble = (layout.pp - 1) / ((layout.vpp or 1) * micro)
    total = (compute + tp_comm + ep_comm) * (1 + bubble) + dp_comm
    return {
        "compute": compute,
        "tp_comm": tp_comm,
        "ep_comm": ep_comm,
        "dp_comm": dp_comm,
        "bubble_fraction": bubble,
        "total": total,
    }


def why_not_runnable(model: LLaDA2ModelConfig, layout: ParallelLayout, hw: Hardware, shape: RunShape, dp: int):
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
    if shape.attention_backend == "flex" and shape.recompute != "none":
        return "flex attention with recompute is refused (megatron-core's checkpoint cannot save a BlockMask)"
    return None


def plan_layouts(model: LLaDA2ModelConfig, hw: Hardware, shape: RunShape, layouts=None, distributed=(True, False)):
    """All plans, feasible ones first (fastest first), then the rest with their reasons."""
    plans = []
    for layout in layouts if layouts is not None else candidate_layouts(model, hw.world):
        dp, edp = group_sizes(layout, hw.world)
        # With no data parallelism there is nothing to shard: one plan (distributed optimizer on).
        for dist in distributed if max(dp, edp) > 1 else distributed[:1]:
            plan = Plan(layout, dp, dist)
            plan.reason = why_not_runnable(model, layout, hw, shape, dp)
            if plan.reason is None:
                run = RunShape(**{**asdict(shape), "use_distributed_optimizer": dist})
                plan.memory = forecast(model, layout, hw, run)
                plan.step_parts = step_time(model, layout, hw, run)
                plan.step_seconds = plan.step_parts["total"]
                if plan.memory.total > hw.memory_bytes:
                    plan.reason = (
                        f"needs {plan.memory.total / GiB:.1f} GiB per GPU (pipeline rank "
                        f"{plan.memory.detail['pp_rank']}), more than {hw.memory_bytes / GiB:.1f} GiB"
                    )
            plans.append(plan)
    plans.sort(key=lambda p: (p.reason is not None, p.step_seconds or 0.0))
    return plans


def model_summary(model: LLaDA2ModelConfig) -> dict:
    return {"total_params": total_params(model), "active_params": active_params(model)}
