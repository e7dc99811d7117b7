"""HF model_type -> model family (megadiff.models.family.ModelFamily).

Families are imported by module name on first use, so importing the registry costs nothing and
generic code never names a family module. Adding a family is one line in FAMILY_MODULES.
"""

import functools
import importlib

from megadiff.errors import ConfigError

FAMILY_MODULES = (
    "megadiff.models.llada2.family",
    "megadiff.models.llada.family",
    "megadiff.models.lladamoe.family",
)


@functools.cache
def _families() -> dict:
    out = {}
    for module in FAMILY_MODULES:
        family = importlib.import_module(module).FAMILY
        out[family.name] = family
    return out


@functools.cache
def _by_model_type() -> dict:
    out = {}
    for family in _families().values():
        for model_type in family.model_types:
            if model_type in out:
                raise RuntimeError(f"model_type {model_type!r} claimed by {out[model_type].name} and {family.name}")
            out[model_type] = family
    return out


def known_model_types() -> list[str]:
    return sorted(_by_model_type())


def families() -> dict:
    """name -> ModelFamily, every registered family."""
    return dict(_families())


def family(name: str):
    """The family called `name` (e.g. "llada2", "llada", "lladamoe")."""
    if name not in _families():
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(sorted(_families()))}")
    return _families()[name]


def family_for_config(cfg: dict, source: str = "config.json"):
    """The family of an HF config.json dict, from its `model_type`.

    LLaDA-MoE checkpoints were published with model_type "llada" (users rename it to "lladamoe" to
    load them with the LLaDA-MoE remote code); their `architectures` says LLaDAMoEModelLM, so such a
    config is given to the LLaDA-MoE family."""
    model_type = cfg.get("model_type")
    by_type = _by_model_type()
    if model_type not in by_type:
        raise ConfigError(
            f"{source}: model_type: {model_type!r} is not a model megadiff knows; "
            f"known model types: {', '.join(known_model_types())}"
        )
    architectures = cfg.get("architectures") or []
    for candidate in _families().values():
        if candidate is not by_type[model_type] and any(a in candidate.architectures for a in architectures):
            return candidate
    return by_type[model_type]


def family_of(model_cfg):
    """The family whose validated config `model_cfg` is (a family's `config_from_hf` is its
    config class's constructor from HF fields; configs do not carry their family)."""
    for candidate in _families().values():
        if isinstance(model_cfg, getattr(candidate.config_from_hf, "__self__", ())):
            return candidate
    raise ConfigError(f"{type(model_cfg).__name__} is not the config of a registered model family")
