"""The LLaDA-MoE family (LLaDA-MoE-7B-A1B-Base / -Instruct): model_type "lladamoe".

Trained like LLaDA (full-attention masked diffusion, prompt never masked, 1/t weighting, divided by
the answer length: the LLaDA-MoE report keeps LLaDA's loss) and sampled with LLaDA's generate.py
(semi-autoregressive blocks after the prompt, low-confidence remasking). The tokenizer is the
Ling-2.0 one that LLaDA2 also uses.
"""

import torch

from megadiff.models.common.reference import randomize_
from megadiff.models.family import DiffusionRecipe, ModelFamily, SamplerDefaults, TokenizerFacts

from .config import ARCHITECTURES, MODEL_TYPES, LLaDAMoEModelConfig, to_transformer_config
from .mapping import TABLE
from .presets import PRESETS
from .reference import LLaDAMoEReference

# Ling-2.0 / LLaDA2 turns: <role>NAME</role>content<|role_end|>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set role_name = 'SYSTEM' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set role_name = 'HUMAN' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role_name = 'ASSISTANT' -%}"
    "{%- else -%}{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<role>' ~ role_name ~ '</role>' ~ message['content'] ~ '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)

TOKENIZER = TokenizerFacts(
    mask_token="<|mask|>",
    mask_token_id=156895,
    eos_token="<|endoftext|>",
    eos_token_id=156892,
    end_of_turn="<|role_end|>",
    chat_template=CHAT_TEMPLATE,
    special_tokens=("<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"),
)

RECIPE = DiffusionRecipe(
    mode="full",
    block_size=None,
    t_low=1e-3,
    t_high=1.0,
    loss_weight="inverse_t",
    normalize="sequence",
    source="LLaDA-MoE report (arXiv 2509.24389): LLaDA's masked-diffusion loss",
)

SAMPLER = SamplerDefaults(
    rule="low_confidence",
    attention="full",
    blocks_from="prompt_end",
    gen_length=128,
    block_length=32,
    steps=128,
    threshold=None,
    source="LLaDA-MoE model card (LLaDA's generate, remasking='low_confidence')",
)


def layer_spec(cfg: LLaDAMoEModelConfig, tconfig, use_te, vp_stage=None, core_attention=None):
    """The bidirectional GPT block spec; with expert bias, MoE layers route with ProbabilityBiasRouter."""
    from megadiff.models.common.spec import bidirectional_block_spec, with_moe_router  # megatron-core

    spec = bidirectional_block_spec(tconfig, use_te, vp_stage=vp_stage, core_attention=core_attention)
    if not cfg.expert_bias:
        return spec
    from .router import ProbabilityBiasRouter

    return with_moe_router(spec, ProbabilityBiasRouter)


def gpt_model_args(cfg: LLaDAMoEModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        share_embeddings_and_output_weights=False,
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=int(cfg.rope_theta),
    )


def build_reference(cfg: dict, seed: int | None = None, dtype=torch.float32) -> LLaDAMoEReference:
    """The reference model of HF config fields `cfg`; with `seed`, random non-trivial weights
    (expert biases too, so a router that ignores them fails)."""
    model = LLaDAMoEReference(LLaDAMoEModelConfig.from_hf_dict(cfg))
    if seed is not None:
        randomize_(model, seed)
        g = torch.Generator().manual_seed(seed + 1)
        for _, block in model.moe_blocks():
            if block.expert_bias is not None:
                block.expert_bias.copy_(0.05 * torch.randn(block.expert_bias.shape, generator=g))
    return model.to(dtype).eval()


FAMILY = ModelFamily(
    name="lladamoe",
    model_types=MODEL_TYPES,
    architectures=ARCHITECTURES,
    config_from_hf=LLaDAMoEModelConfig.from_hf_dict,
    transformer_config=to_transformer_config,
    layer_spec=layer_spec,
    gpt_model_args=gpt_model_args,
    mapping=TABLE,
    build_reference=build_reference,
    tokenizer=TOKENIZER,
    recipe=RECIPE,
    sampler=SAMPLER,
    presets=PRESETS,
)
