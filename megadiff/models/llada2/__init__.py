"""LLaDA2 on megatron-core: HF config mapping, layer spec, model construction."""

from .config import ConfigError, LLaDA2ModelConfig, ParallelLayout, to_transformer_config
from .presets import PRESETS, preset
