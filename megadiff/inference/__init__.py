"""Block-wise diffusion decoding (LLaDA2.0 model card `generate`, LLaDA2.1 draft and edit) with a prefix KV cache."""

from .editing import select_commits, select_edits, transfer_schedule
from .loading import is_mcore_checkpoint, load_model, load_tokenizer, special_token_ids
from .sampler import (
    DecodingOptions,
    GenerationResult,
    block_causal_mask,
    generate,
    sample_tokens,
)
from .text import ChatSession, decode_tokens, encode_chat, encode_prompt
