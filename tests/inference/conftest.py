import pytest
import torch
from inference_helpers import EOS_ID

from megadiff.hf.reference import build_reference_model
from megadiff.models.llada2.presets import preset


def tiny_model(seed, lm_head_scale=1.0):
    model = build_reference_model(preset("tiny", pad_token_id=EOS_ID, eos_token_id=EOS_ID), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    return model


@pytest.fixture(scope="session")
def sharp_model():
    """Tiny random model whose predictions are sharp enough that some clear the 0.95 threshold and
    some do not, so both branches of the commit rule run."""
    return tiny_model(seed=0, lm_head_scale=20.0)


@pytest.fixture(scope="session")
def flat_model():
    """Tiny random model with near-uniform predictions (no confidence reaches 0.95)."""
    return tiny_model(seed=1)
