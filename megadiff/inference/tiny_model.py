"""A tiny random LLaDA2 model directory (tokenizer + weights) for tests, demos and benchmarks.

Nothing is downloaded: the tokenizer is the tiny byte-level BPE built on the spot, the model is the
`tiny` preset with seeded random weights. `lm_head_scale` sharpens the output distribution so some
predictions clear the 0.95 confidence threshold, as a trained model's do.
"""

from __future__ import annotations

import os

import torch


def build_tiny_model(eos_id: int, seed: int = 0, lm_head_scale: float = 1.0):
    """The tiny-preset reference model with random weights (pad = eos = eos_id)."""
    from megadiff.hf.reference import build_reference_model
    from megadiff.models.llada2.presets import preset

    model = build_reference_model(preset("tiny", pad_token_id=eos_id, eos_token_id=eos_id), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    return model


def save_tiny_model_dir(out_dir: str, seed: int = 0, lm_head_scale: float = 1.0) -> str:
    """Write tokenizer files + config.json + safetensors of a tiny random model to out_dir; return it."""
    from megadiff.hf.reference import save_reference_model
    from megadiff.hf.tokenizer import build_tiny_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out_dir)
    save_reference_model(build_tiny_model(tokenizer.eos_token_id, seed, lm_head_scale), out_dir)
    return out_dir
