"""A tiny HF directory of a model family built locally, laid out like a real download.

LLaDA2 (the default): tokenizer.json / tokenizer_config.json (LLaDA2 special tokens and chat
template), config.json with `auto_map`, remote-code files, random-init safetensors. Tests and
`make demo` start from it. Other families (`family="llada"`, `"lladamoe"`): the family's tiny
preset written by megadiff.models.common.hf_dir.write_reference_dir (config.json, model.safetensors
under the released names) and a tiny tokenizer with the family's special tokens and chat template
(its TokenizerFacts), whose EOS / pad / mask ids config.json then names.
"""

import os

from megadiff.hf.reference import build_reference_model, save_reference_model
from megadiff.hf.tokenizer import EOS_TOKEN, MASK_TOKEN, build_tiny_tokenizer
from megadiff.models.common.hf_dir import write_reference_dir
from megadiff.models.registry import family as family_named

DEFAULT_FAMILY = "llada2"


def write_tiny_model_dir(out_dir: str, seed: int = 0, family: str = DEFAULT_FAMILY, **config_overrides) -> str:
    os.makedirs(out_dir, exist_ok=True)
    fam = family_named(family)
    facts = None if family == DEFAULT_FAMILY else fam.tokenizer
    tokenizer = build_tiny_tokenizer(out_dir, facts)
    eos = tokenizer.convert_tokens_to_ids(facts.eos_token if facts else EOS_TOKEN)
    mask = tokenizer.convert_tokens_to_ids(facts.mask_token if facts else MASK_TOKEN)
    ids = dict(pad_token_id=eos, eos_token_id=eos, mask_token_id=mask)
    vocab = fam.preset("tiny", **ids, **config_overrides)["vocab_size"]
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab}")
    if family == DEFAULT_FAMILY:
        cfg = fam.preset("tiny", **ids, **config_overrides)
        save_reference_model(build_reference_model(cfg, seed=seed), out_dir)
    else:
        write_reference_dir(fam, out_dir, "tiny", seed=seed, **ids, **config_overrides)
    return out_dir
