"""The LLaDA family (LLaDA-8B-Base / -Instruct, LLaDA 1.5): model_type "llada".

Dense, bidirectional, trained as full-attention masked diffusion: one noise level t per sample,
each answer token masked with probability t, the prompt never masked, cross-entropy on masked
tokens weighted 1/t and divided by the answer length (LLaDA's SFT recipe). Generation is LLaDA's
generate.py: the answer is cut into blocks after the prompt, each block gets steps/blocks
iterations, and each iteration commits its quota of the most confident masked positions
("low_confidence" remasking) with full attention over the whole sequence.
"""

import torch

from megadiff.models.common.reference import randomize_
from megadiff.models.family import DiffusionRecipe, ModelFamily, SamplerDefaults, TokenizerFacts

from .config import MODEL_TYPES, LLaDAModelConfig, to_transformer_config
from .mapping import TABLE
from .presets import PRESETS
from .reference import LLaDAReference

# LLaDA-8B-Instruct's turns (Llama-3 style headers); the released tokenizer carries the same.
CHAT_TEMPLATE = (
    "{{- '<|startoftext|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ message['content'] ~ '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

TOKENIZER = TokenizerFacts(
    mask_token="<|mdm_mask|>",
    mask_token_id=126336,
    eos_token="<|endoftext|>",
    eos_token_id=126081,
    end_of_turn="<|eot_id|>",
    chat_template=CHAT_TEMPLATE,
    special_tokens=(
        "<|startoftext|>",
        "<|endoftext|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|mdm_mask|>",
    ),
)

RECIPE = DiffusionRecipe(
    mode="full",
    block_size=None,
    # LLaDA: t ~ U(0, 1), masking probability (1 - eps) t + eps with eps = 1e-3
    t_low=1e-3,
    t_high=1.0,
    loss_weight="inverse_t",
    normalize="sequence",
    source="LLaDA SFT (arXiv 2502.09992, Algorithm 2; GUIDELINES.md of ML-GSAI/LLaDA)",
)

SAMPLER = SamplerDefaults(
    rule="low_confidence",
    attention="full",
    blocks_from="prompt_end",
    gen_length=128,
    block_length=32,
    steps=128,
    threshold=None,
    source="ML-GSAI/LLaDA generate.py (remasking='low_confidence', cfg_scale=0)",
)


def layer_spec(cfg, tconfig, use_te, vp_stage=None, core_attention=None):
    from megadiff.models.common.spec import bidirectional_block_spec  # megatron-core: only to build

    return bidirectional_block_spec(tconfig, use_te, vp_stage=vp_stage, core_attention=core_attention)


def gpt_model_args(cfg: LLaDAModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        share_embeddings_and_output_weights=False,
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta),
    )


def build_reference(cfg: dict, seed: int | None = None, dtype=torch.float32) -> LLaDAReference:
    """The reference model of HF config fields `cfg`; with `seed`, random non-trivial weights."""
    model = LLaDAReference(LLaDAModelConfig.from_hf_dict(cfg))
    if seed is not None:
        randomize_(model, seed, norm_names=("norm", "ln_f"))
    return model.to(dtype).eval()


FAMILY = ModelFamily(
    name="llada",
    model_types=MODEL_TYPES,
    architectures=("LLaDAModelLM",),
    config_from_hf=LLaDAModelConfig.from_hf_dict,
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
