"""The plain-PyTorch LLaDA2 reference model (HF weight names; megadiff.models.llada2), its loading and saving.

The names below are imported on first use: the reference model needs transformers (~2 s of
imports), which `megadiff.hf.checkpoint_reader` and `megadiff.hf.remote_code` (used by tools that
only move bytes) do not. Importing `megadiff.hf.reference` registers llada2_moe with transformers'
Auto classes.
"""

_REFERENCE = ("build_reference_model", "load_reference_model", "register_with_transformers", "save_reference_model")
_MODEL = {"LLaDA2MoeConfig": "configuration_llada2_moe", "LLaDA2MoeModelLM": "modeling_llada2_moe"}


def __getattr__(name):
    import importlib

    if name in _REFERENCE:
        return getattr(importlib.import_module(".reference", __name__), name)
    if name in _MODEL:
        return getattr(importlib.import_module("megadiff.models.llada2." + _MODEL[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LLaDA2MoeConfig", "LLaDA2MoeModelLM", *_REFERENCE]
