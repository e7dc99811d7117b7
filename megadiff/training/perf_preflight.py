"""Speed options checked before anything is built: refuse what cannot work, pick the attention backend.

`check_perf(cfg, env, layers_per_stage)` raises TrainingConfigError naming the `perf.*` key, why
the combination cannot work, and what to use instead. `env` (megadiff.platform.kernels.Environment)
says what the run device and this process can use, so tests can ask "on an A100 without TE" on a
CPU machine. megatron-core would otherwise fail much later (inside the model build, or at the
first forward on the GPU) with an assertion that does not name the config key.

`choose_moe_experts(cfg, env, ...)` resolves `perf.moe_experts: auto` (TE's grouped experts, else
torch._grouped_mm, else one GEMM per expert) and refuses a choice this run cannot have.

`choose_attention_backend(cfg, env, ...)` resolves `model.attention_backend: auto` and prices dense
masks: dense attention (megatron-core's local DotProductAttention, and TE's unfused path, which is
what TE takes for an arbitrary mask) materialises [b, h/tp, S_in, S_in] scores and keeps the
softmax for backward in every layer of the stage.
"""

from dataclasses import dataclass

import torch

from megadiff.errors import ConfigError
from megadiff.models.common.grouped_experts import ExpertsChoice, choose_experts, grouped_problem
from megadiff.platform.kernels import GROUPED_MM_DTYPES, Environment
from megadiff.training.config import TrainingConfig, TrainingConfigError
from megadiff.training.phases import uses_block_diffusion

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell have FP8 tensor cores
FP8_RECIPE_MIN_CAPABILITY = {"mxfp8": (10, 0), "blockwise": (9, 0)}
# Dense attention is refused when its saved scores alone exceed this share of the GPU's memory
# (the weights, optimizer state and the rest of the activations need the remainder).
DENSE_SCORES_MAX_FRACTION = 0.5
DENSE_SCORES_WARN_BYTES = 1 << 30


def _fail(key: str, why: str, instead: str):
    raise TrainingConfigError(f"{key}: {why}; {instead}")


def check_perf(cfg: TrainingConfig, env: Environment, layers_per_stage: int | None = None) -> None:
    """Refuse every perf combination that cannot work on `env` (see the module docstring);
    `layers_per_stage` (when known) bounds block recompute."""
    p, par = cfg.perf, cfg.parallel
    if p.fp8 != "off":
        key = f"perf.fp8={p.fp8}"
        if not env.on_cuda:
            _fail(key, "FP8 needs a CUDA GPU and this run computes on the CPU", "set perf.fp8=off")
        if not env.te:
            _fail(
                key,
                "FP8 runs through Transformer Engine, which megatron-core cannot import here",
                "install transformer_engine (an NGC PyTorch image has it) or set perf.fp8=off",
            )
        cc = env.compute_capability or (0, 0)
        if cc < FP8_MIN_CAPABILITY:
            _fail(
                key,
                f"{env.gpu_name} (compute capability {cc[0]}.{cc[1]}) has no FP8 tensor cores "
                f"(needs {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: L40/H100/H200/B200)",
                "set perf.fp8=off (bf16)",
            )
        need = FP8_RECIPE_MIN_CAPABILITY.get(p.fp8_recipe)
        if need and cc < need:
            _fail(
                f"perf.fp8_recipe={p.fp8_recipe}",
                f"needs compute capability {need[0]}.{need[1]}+, {env.gpu_name} has {cc[0]}.{cc[1]}",
                "use perf.fp8_recipe=tensorwise or delayed",
            )
    if p.moe_token_dispatcher_type == "flex" and not env.deepep:
        _fail(
            "perf.moe_token_dispatcher_type=flex",
            "the flex dispatcher needs DeepEP (deep_ep), which cannot be imported here",
            "install DeepEP or use perf.moe_token_dispatcher_type=alltoall",
        )
    for name in ("moe_permute_fusion", "moe_router_fusion"):
        if getattr(p, name) and not env.te:
            _fail(
                f"perf.{name}=true",
                "megatron-core takes this fused kernel from Transformer Engine, which it cannot import here",
                f"set perf.{name}=false or install transformer_engine",
            )
    if p.gradient_accumulation_fusion:
        if not env.on_cuda:
            _fail(
                "perf.gradient_accumulation_fusion=true",
                "it is a CUDA kernel and this run computes on the CPU",
                "leave perf.gradient_accumulation_fusion unset",
            )
        if not env.apex_wgrad:
            _fail(
                "perf.gradient_accumulation_fusion=true",
                "megatron-core's linear layers (the LM head "
                "always) need apex's fused_weight_gradient_mlp_cuda, which cannot be imported here",
                "install apex with --cuda_ext or leave perf.gradient_accumulation_fusion unset",
            )
    if p.overlap_param_gather and not par.use_distributed_optimizer:
        _fail(
            "perf.overlap_param_gather=true",
            "only the distributed optimizer gathers parameters",
            "set parallel.use_distributed_optimizer=true or perf.overlap_param_gather=false",
        )
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        _fail(
            "perf.overlap_param_gather=true",
            "megatron-core overlaps the parameter all-gather only together with the gradient reduce-scatter",
            "also set perf.overlap_grad_reduce=true",
        )
    if p.optimizer_cpu_offload:
        if not env.on_cuda:
            _fail(
                "perf.optimizer_cpu_offload=true",
                "this run computes on the CPU, where the optimizer state already is",
                "set perf.optimizer_cpu_offload=false",
            )
        if not par.use_distributed_optimizer:
            _fail(
                "perf.optimizer_cpu_offload=true",
                "megatron-core offloads through the precision-aware distributed optimizer",
                "set parallel.use_distributed_optimizer=true",
            )
        if not env.te:
            _fail(
                "perf.optimizer_cpu_offload=true",
                "megatron-core's precision-aware optimizer takes "
                "Transformer Engine's FusedAdam, which cannot be imported here",
                "install transformer_engine or set perf.optimizer_cpu_offload=false",
            )
    if p.cross_entropy_loss_fusion:
        _fail(
            "perf.cross_entropy_loss_fusion=true",
            "megadiff's diffusion loss computes the exact "
            "vocab-parallel cross entropy at the masked x_t positions only; megatron-core's fused one "
            "gave gradients 1.7e-3 away from torch's cross entropy in an fp32 CPU check, so "
            "it is not wired in",
            "leave perf.cross_entropy_loss_fusion=false",
        )
    _check_recompute(cfg, layers_per_stage)
    cp = cfg.parallel.cp
    if (cfg.model.attention_backend == "flex" or cp > 1) and recomputes_core_attention(cfg):
        _fail(
            "model.attention_backend=flex" if cp == 1 else f"parallel.cp={cp} (which attends through flex)",
            "recomputing core attention saves attention_mask with "
            "save_for_backward, which takes tensors, not a BlockMask",
            "recompute selectively without "
            "core_attn (flex attention keeps no [s, s] activations)"
            + (", or use model.attention_backend=dense" if cp == 1 else ""),
        )


def _check_recompute(cfg: TrainingConfig, per_stage: int | None) -> None:
    p = cfg.perf
    g = p.recompute_granularity
    if g != "full" and (p.recompute_method is not None or p.recompute_num_layers is not None):
        _fail(
            "perf.recompute_method/recompute_num_layers",
            f"apply to full recompute only, not {g}",
            "set perf.recompute_granularity=full or unset them",
        )
    if g != "selective" and p.recompute_modules is not None:
        _fail(
            "perf.recompute_modules",
            f"apply to selective recompute only, not {g}",
            "set perf.recompute_granularity=selective or unset perf.recompute_modules",
        )
    if g == "full" and (p.recompute_method is None or p.recompute_num_layers is None):
        _fail(
            "perf.recompute_granularity=full",
            "needs perf.recompute_method (uniform or block) and perf.recompute_num_layers",
            "set both, e.g. recompute_method=uniform recompute_num_layers=1",
        )
    if g == "full" and p.recompute_method == "block":
        if per_stage is not None and p.recompute_num_layers > per_stage:
            _fail(
                f"perf.recompute_num_layers={p.recompute_num_layers}",
                f"is more than the {per_stage} layers of a pipeline stage",
                f"use at most {per_stage}",
            )


def recomputes_core_attention(cfg: TrainingConfig) -> bool:
    p = cfg.perf
    modules = p.recompute_modules if p.recompute_modules is not None else ["core_attn"]  # mcore's default
    return p.recompute_granularity == "full" or (p.recompute_granularity == "selective" and "core_attn" in modules)


# ---- routed experts -------------------------------------------------------------------------------


def choose_moe_experts(
    cfg: TrainingConfig, env: Environment, hidden_size: int, expert_ffn_per_rank: int, dtype: torch.dtype
) -> ExpertsChoice:
    """The routed experts of this run (perf.moe_experts resolved on `env`). TE's grouped experts need
    the TE spec, which LoRA runs do not build; grouped experts (torch._grouped_mm) need the kernel in
    the run's dtype and rows of whole multiples of 16 bytes, and call no per-expert linear, so not
    with LoRA on routed experts (auto then picks sequential). megatron-core recomputes the expert
    activation (`moe_act`) only in TE's grouped experts, and FP8 experts are TE's."""
    p = cfg.perf
    te = env.on_cuda and env.te and not cfg.lora.enabled
    if cfg.lora.enabled and cfg.lora.experts:
        why_not = "lora.experts=true adapts each routed expert's own linears, which grouped experts do not call"
    else:
        runs = any(GROUPED_MM_DTYPES[n] == str(dtype).removeprefix("torch.") for n in env.grouped_mm_dtypes)
        why_not = grouped_problem(dtype, hidden_size, expert_ffn_per_rank, runs=runs)
    try:
        choice = choose_experts(p.moe_experts, te, why_not, key="perf.moe_experts")
    except ConfigError as e:
        raise TrainingConfigError(str(e)) from None
    if p.fp8 != "off" and choice.backend != "te":
        _fail(
            f"perf.fp8={p.fp8}",
            f"FP8 experts are Transformer Engine's, and this run's are {choice.backend} ({choice.reason})",
            "use perf.moe_experts=te (or auto) with FP8, or perf.fp8=off",
        )
    if p.recompute_granularity == "selective" and "moe_act" in (p.recompute_modules or []) and choice.backend != "te":
        _fail(
            "perf.recompute_modules=[moe_act]",
            f"megatron-core recomputes the expert activation only in Transformer Engine's grouped experts, "
            f"and this run's are {choice.backend} ({choice.reason})",
            "drop moe_act (or use perf.moe_experts=te on a GPU with Transformer Engine)",
        )
    return choice


# ---- attention backend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionChoice:
    backend: str  # "dense" or "flex"
    reason: str
    dense_scores_bytes: int | None = None  # saved [b, h/tp, S_in, S_in] scores of one stage, dense only
    warning: str | None = None


def dense_scores_bytes(micro_batch: int, heads: int, tp: int, seq_in: int, layers: int, dtype_bytes: int) -> int:
    """Bytes of the softmax probabilities dense attention keeps for backward: one
    [micro_batch, heads/tp, seq_in, seq_in] tensor per layer of the stage (the mask, the scores
    before softmax and their gradient are transient on top of this)."""
    return micro_batch * (heads // tp) * seq_in * seq_in * layers * dtype_bytes


def choose_attention_backend(
    cfg: TrainingConfig, env: Environment, heads: int, layers_per_stage: int, dtype_bytes: int
) -> AttentionChoice:
    """The attention backend a run uses (model.attention_backend resolved), with the dense scores'
    memory on CUDA. auto: flex on CUDA for block diffusion and packed full attention (block-sparse,
    no [s, s] tensors), dense on the CPU (torch's CPU flex is correct but slow) and for
    unpacked full attention (no mask at all); dense too when core attention is recomputed; always
    flex with context parallelism (parallel.cp > 1).
    Dense on CUDA warns above 1 GiB of saved scores and is refused above half the GPU's memory."""
    requested = cfg.model.attention_backend
    bd = uses_block_diffusion(cfg)  # any block-diffusion phase of diffusion.block_schedule
    if requested != "auto":
        backend, reason = requested, "model.attention_backend=" + requested
    elif cfg.parallel.cp > 1:
        backend, reason = "flex", f"auto: context parallelism (parallel.cp={cfg.parallel.cp}) attends through flex"
    elif not env.on_cuda:
        backend, reason = "dense", "auto: the CPU runs dense attention (CPU flex is for tests)"
    elif recomputes_core_attention(cfg):
        backend, reason = "dense", "auto: core attention is recomputed, which flex cannot be"
    elif bd or cfg.data.mode == "pack":
        backend, reason = "flex", "auto: flex on CUDA for " + ("block diffusion" if bd else "packed full attention")
    else:
        backend, reason = "dense", "auto: full attention over unpacked rows"
    if backend == "flex" or not env.on_cuda:
        return AttentionChoice(backend, reason)
    seq_in = cfg.data.max_seq_len * (2 if bd else 1)
    size = dense_scores_bytes(cfg.train.micro_batch_size, heads, cfg.parallel.tp, seq_in, layers_per_stage, dtype_bytes)
    gib = size / 2**30
    what = (
        f"dense attention keeps [b={cfg.train.micro_batch_size}, h/tp={heads // cfg.parallel.tp}, "
        f"{seq_in}, {seq_in}] scores in each of {layers_per_stage} layers: {gib:.1f} GiB"
    )
    if env.gpu_memory_bytes and size > DENSE_SCORES_MAX_FRACTION * env.gpu_memory_bytes:
        _fail(
            f"model.attention_backend={requested}",
            f"{what}, more than half of the {env.gpu_memory_bytes / 2**30:.0f} GiB of {env.gpu_name}",
            "use model.attention_backend=flex (or auto), or lower data.max_seq_len / train.micro_batch_size",
        )
    warning = f"{what}; model.attention_backend=flex needs none of it" if size > DENSE_SCORES_WARN_BYTES else None
    return AttentionChoice(backend, reason, size, warning)
