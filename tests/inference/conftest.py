import pytest

from inference_helpers import EOS_ID

from megadiff.inference.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def sharp_model():
    """Tiny random model whose predictions are sharp enough that some clear the 0.95 threshold and
    some do not, so both branches of the commit rule run."""
    return build_tiny_model(eos_id=EOS_ID, seed=0, lm_head_scale=20.0)


@pytest.fixture(scope="session")
def flat_model():
    """Tiny random model with near-uniform predictions (no confidence reaches 0.95)."""
    return build_tiny_model(eos_id=EOS_ID, seed=1)
