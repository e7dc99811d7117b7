"""Block-wise diffusion decoding (LLaDA2 model card `generate`) with a prefix KV cache."""

from .loading import is_mcore_checkpoint, load_model, load_tokenizer, special_token_ids
from .sampler import (
    DecodingOptions,
    GenerationResult,
    block_causal_mask,
    generate,
    sample_tokens,
    select_commits,
    transfer_schedule,
)
from .text import ChatSession, decode_tokens, encode_chat, encode_prompt
