"""The plain-PyTorch LLaDA2 reference model (HF weight names), its loading and saving."""

from .configuration_llada2_moe import LLaDA2MoeConfig
from .modeling_llada2_moe import LLaDA2MoeModelLM
from .reference import (
    build_reference_model,
    expected_hf_shapes,
    load_reference_model,
    register_with_transformers,
    save_reference_model,
)

register_with_transformers()
