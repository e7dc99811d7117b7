"""A tiny LLaDA2 HF directory built locally, laid out like a real LLaDA2 download.

tokenizer.json / tokenizer_config.json (LLaDA2 special tokens and chat template), config.json with
`auto_map`, remote-code files, random-init safetensors. Tests and `make demo` start from it.
"""

import os

from megadiff.hf.reference import build_reference_model, save_reference_model
from megadiff.hf.tokenizer import EOS_TOKEN, MASK_TOKEN, build_tiny_tokenizer
from megadiff.models.llada2.presets import preset


def write_tiny_model_dir(out_dir: str, seed: int = 0, **config_overrides) -> str:
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    cfg = preset(
        "tiny",
        pad_token_id=eos,
        eos_token_id=eos,
        mask_token_id=tokenizer.convert_tokens_to_ids(MASK_TOKEN),
        **config_overrides,
    )
    if len(tokenizer) > cfg["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={cfg['vocab_size']}")
    save_reference_model(build_reference_model(cfg, seed=seed), out_dir)
    return out_dir
