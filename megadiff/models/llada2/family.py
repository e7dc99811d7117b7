"""The LLaDA2 family (LLaDA2.0 / 2.1 mini and flash; BailingMoeV2 / Ling-2.0 architecture).

Wraps what megadiff.models.llada2 has: config (config.py), layer spec (spec.py), mapping objects
(mapping.py), and the reference model (reference.py over modeling_llada2_moe.py, which is also the
remote code written next to LLaDA2 checkpoints).
"""

from megadiff.models.family import DiffusionRecipe, ModelFamily, SamplerDefaults, TokenizerFacts

from .config import LLaDA2ModelConfig, to_transformer_config
from .hf_format import HF_FORMAT
from .mapping import TABLE
from .presets import PRESETS

# The LLaDA2.0 tokenizer's turns (megadiff.hf.tokenizer builds tiny tokenizers with it).
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
    mask_token_id=None,  # 156895 in the released vocabulary; read from the tokenizer
    eos_token="<|endoftext|>",
    eos_token_id=156892,
    end_of_turn="<|role_end|>",
    chat_template=CHAT_TEMPLATE,
    special_tokens=("<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"),
)

RECIPE = DiffusionRecipe(
    mode="block_diffusion",
    block_size=32,
    t_low=0.3,
    t_high=0.8,
    loss_weight="none",
    normalize="masked_tokens",
    source="dFactory's LLaDA2 SFT recipe (mask-ratio bandwidth U(0.3, 0.8), mean over masked tokens)",
)

SAMPLER = SamplerDefaults(
    rule="threshold",
    attention="block_causal",
    blocks_from="start",
    gen_length=256,
    block_length=32,
    steps=32,
    threshold=0.95,
    source="LLaDA2.0 model card generate()",
)


def layer_spec(cfg, tconfig, use_te, vp_stage=None, core_attention=None):
    from .spec import llada2_block_spec  # megatron-core only when a model is built

    return llada2_block_spec(tconfig, use_te, vp_stage=vp_stage, core_attention=core_attention)


def gpt_model_args(cfg: LLaDA2ModelConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        share_embeddings_and_output_weights=False,
        rotary_percent=cfg.partial_rotary_factor,
        rotary_base=int(cfg.rope_theta),
    )


def build_reference(cfg: dict, seed: int | None = None):
    from .reference import build_reference_model  # transformers: only when a reference is built

    return build_reference_model(cfg, seed=seed)


FAMILY = ModelFamily(
    name="llada2",
    model_types=("llada2_moe", "bailing_moe_v2", "bailing_moe"),
    architectures=("LLaDA2MoeModelLM", "BailingMoeV2ForCausalLM"),
    config_from_hf=LLaDA2ModelConfig.from_hf_dict,
    transformer_config=to_transformer_config,
    layer_spec=layer_spec,
    gpt_model_args=gpt_model_args,
    mapping=TABLE,
    build_reference=build_reference,
    tokenizer=TOKENIZER,
    recipe=RECIPE,
    sampler=SAMPLER,
    presets=PRESETS,
    hf_format=HF_FORMAT,
)
