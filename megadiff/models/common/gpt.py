"""Build any family's model as megatron-core GPTModel chunks for the current rank, and run them.

The family supplies the TransformerConfig, the layer spec and the GPTModel arguments (vocabulary,
RoPE); everything else is the same for every family: RoPE follows explicit position ids (GPTModel's
multimodal-RoPE path with every frequency in the first section), attention masks are megadiff bool
masks (True = may attend) or FlexAttention BlockMasks, and the x_t-only output hook serves block
diffusion.

x_t-only output layer (`xt_only_logits=True`, block-diffusion training): the loss reads the logits
of the x_t half only, so the final norm, the LM head and the logits run on that half: a forward
pre-hook on the last stage's final norm keeps the first half of the sequence. Under sequence
parallelism each TP rank holds 2S/tp consecutive tokens, so the hook gathers the sequence, keeps
the first S (right-padded to a multiple of tp) and splits it again; the LM head then gathers as
usual and returns [b, S(+pad), V/tp] logits. The x_0 half's hidden states get no gradient from the
head, exactly as before, when its logits were computed and never used. Under context parallelism a
rank holds S/cp x_t tokens followed by S/cp x_0 tokens (megadiff.models.common.context_parallel), so
the same hook keeps its x_t part.
"""

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from torch.nn.attention.flex_attention import BlockMask

from megadiff.errors import ConfigError
from megadiff.platform import compat
from megadiff.platform.device import run_device

from .grouped_experts import choose_experts, grouped_problem, with_grouped_experts
from .spec import transformer_engine_usable

ATTENTION_BACKENDS = ("dense", "flex")


def build_gpt_chunks(
    family,
    model_cfg,
    layout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    attention_backend: str = "dense",
    xt_only_logits: bool = False,
    moe_experts: str = "auto",
    **config_overrides,
):
    """One GPTModel per virtual-pipeline chunk held by this rank (a list of one without VPP).

    attention_backend: "dense" = the spec's core attention with dense bool masks; "flex" =
    FlexCoreAttention, whose masks are BlockMasks. xt_only_logits: inputs are [x_t ; x_0] and only
    x_t's logits are wanted. moe_experts: routed experts of MoE layers, "te" (TEGroupedMLP), "grouped"
    (TorchGroupedMLP on torch._grouped_mm), "sequential" (SequentialMLP) or "auto"
    (megadiff.models.common.grouped_experts). Process groups must already exist for `layout`."""

    if attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    if layout.cp > 1 and attention_backend != "flex":
        raise ConfigError(
            f"context parallelism (--cp {layout.cp}) needs attention_backend='flex' (keys gathered over the CP "
            f"group, local-query BlockMasks); megatron-core's dense DotProductAttention asserts cp = 1"
        )
    if use_te is None:
        use_te = transformer_engine_usable()
    compat.define_te_general_gemm_without_te()  # the router reads it, on CPU and CUDA without TE
    compat.silence_gptmodel_deprecation()
    device = run_device()
    on_cpu = device.type == "cpu"
    config_overrides.setdefault("use_cpu_initialization", device == torch.device("cpu"))
    config = family.transformer_config(
        model_cfg, layout, params_dtype, use_te=use_te, on_cpu=on_cpu, **config_overrides
    )
    experts = None
    if config.num_moe_experts:
        experts = routed_experts(model_cfg, layout, params_dtype, moe_experts, use_te).backend
        config_overrides["moe_grouped_gemm"] = experts == "te"
        config = family.transformer_config(
            model_cfg, layout, params_dtype, use_te=use_te, on_cpu=on_cpu, **config_overrides
        )
    core_attention = None
    if attention_backend == "flex":
        from .attention import FlexCoreAttention, check_flex_supported  # compiles flex at import

        check_flex_supported(config)
        core_attention = FlexCoreAttention
    chunks = []
    for vp in range(layout.vpp or 1):
        vp_stage = vp if layout.vpp else None
        spec = family.layer_spec(model_cfg, config, use_te, vp_stage, core_attention)
        if experts == "grouped":
            spec = with_grouped_experts(spec)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="mrope",
            vp_stage=vp_stage,
            **family.gpt_model_args(model_cfg),
        )
        if xt_only_logits and model.post_process:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            model.decoder.final_layernorm.xt_only = True  # set_xt_only_logits switches it per phase
            model.decoder.final_layernorm.register_forward_pre_hook(
                partial(_keep_first_half, sequence_parallel=config.sequence_parallel, tp=tp)
            )
        if not on_cpu:
            model.cuda(device)
        chunks.append(model)
    return chunks


def routed_experts(model_cfg, layout, dtype, requested: str, use_te: bool | None = None, key: str = "moe_experts"):
    """The routed experts `build_gpt_chunks` gives this MoE model (an ExpertsChoice): `requested`
    resolved for this process (TE with the TE spec, default where megatron-core can use it;
    torch._grouped_mm where it runs on the run device in `dtype`). Tools call it first, to log the
    choice and have errors name their own flag (`key`)."""
    use_te = transformer_engine_usable() if use_te is None else use_te
    why_not = grouped_problem(dtype, model_cfg.hidden_size, model_cfg.moe_ffn_hidden_size // layout.etp)
    return choose_experts(requested, use_te, why_not, key=key)


def set_xt_only_logits(chunks, enabled: bool) -> None:
    """Switch the x_t-only output layer of a model built with xt_only_logits=True on (inputs
    [x_t ; x_0]) or off (inputs x_t alone: a full-attention phase of a block schedule)."""
    for chunk in chunks:
        inner = _unwrapped(chunk)
        if inner.post_process and hasattr(inner.decoder.final_layernorm, "xt_only"):
            inner.decoder.final_layernorm.xt_only = enabled


def _unwrapped(chunk) -> GPTModel:
    while not isinstance(chunk, GPTModel):  # megatron-core DDP / Float16Module wrap it as .module
        chunk = chunk.module
    return chunk


def _keep_first_half(module, args, sequence_parallel: bool, tp: int):
    """Forward pre-hook of the final norm: hidden [2S(/tp), b, h] -> the x_t half [S(/tp), b, h]."""
    if not module.xt_only:
        return None
    hidden, *rest = args
    if sequence_parallel:
        # backward of this gather is a split: the gradient below is the same on every TP rank
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    half = hidden[: hidden.shape[0] // 2]
    if sequence_parallel:
        pad = -half.shape[0] % tp
        if pad:
            half = torch.cat([half, half.new_zeros(pad, *half.shape[1:])])
        half = scatter_to_sequence_parallel_region(half.contiguous())
    return (half, *rest)


def mcore_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] position ids -> the [3, b, s] form GPTModel's position-id RoPE path takes."""
    return position_ids.unsqueeze(0).expand(3, -1, -1)


def mcore_attention_mask(allowed: torch.Tensor | None) -> torch.Tensor | None:
    """megadiff masks say True = may attend ([b, q, k] or [b, 1, q, k]); megatron-core's say True =
    masked out ([b, 1, q, k]). None stays None (full bidirectional attention)."""
    if allowed is None:
        return None
    if allowed.dim() == 3:
        allowed = allowed.unsqueeze(1)
    return ~allowed.bool()


def forward_chunk(model: GPTModel, input_ids, position_ids, allowed=None, embedding_noise=None):
    """Run one chunk: returns vocab-parallel logits [b, s, V/tp] on the last stage, else hidden.

    allowed: a megadiff bool mask (True = may attend; dense backend), a BlockMask (flex
    backend, passed through as is), or None (full attention). embedding_noise: [b, s, h] added to
    the embedding output on the first stage (diffusion.mask_embedding_noise), or None."""
    positions = mcore_position_ids(position_ids)
    decoder_input = None
    inner = _unwrapped(model)
    if embedding_noise is not None and inner.pre_process:
        decoder_input = inner.embedding(input_ids=input_ids, position_ids=positions)  # [s(/tp), b, h]
        noise = embedding_noise.transpose(0, 1).to(decoder_input.dtype)
        if inner.config.sequence_parallel:  # the embedding output is this TP rank's slice of the sequence
            tp = parallel_state.get_tensor_model_parallel_world_size()
            noise = noise.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
        decoder_input = decoder_input + noise
    return model(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=allowed if isinstance(allowed, BlockMask) else mcore_attention_mask(allowed),
        decoder_input=decoder_input,
    )
