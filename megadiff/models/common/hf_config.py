"""Reading an HF config.json into a family's validated config: typed fields, errors naming the field.

Every check runs before anything is built and raises ConfigError "<file>: <field>: <why>".
"""

import json
import math

from megadiff.errors import ConfigError
from megadiff.platform.parallel_layout import ParallelLayout

_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
MISSING = object()


def checked_type(value, kind, fail):
    """`value` if it is a `kind` (int, float, bool or str; an int is a float too), else fail(why).
    JSON numbers keep their spelling: 16.0 is not an integer, "1" is not a number."""
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        fail(f"must be {_WORDS[kind]}, got {json.dumps(value)}")
    if kind is float and not math.isfinite(value):
        fail(f"must be a finite number, got {value}")
    return float(value) if kind is float else value


class HFFields:
    """Typed access to one config.json dict; every error names `source` and the field."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def fail(self, field: str, why: str):
        raise ConfigError(f"{self.source}: {field}: {why}")

    def get(self, field: str, kind, default=MISSING):
        """cfg[field] checked against `kind`; absent or null -> `default` (required without one)."""
        value = self.cfg.get(field)
        if value is None:
            if default is MISSING:
                self.fail(field, "required field is missing")
            return default
        return checked_type(value, kind, lambda why: self.fail(field, why))

    def positive(self, field: str, kind=int, default=MISSING):
        value = self.get(field, kind, default)
        if value is not None and not value > 0:
            self.fail(field, f"must be positive, got {value}")
        return value

    def token_id(self, field: str):
        """An optional token id; a list (several EOS ids) gives its first entry."""
        value = self.cfg.get(field)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            return None
        value = checked_type(value, int, lambda why: self.fail(field, why))
        if value < 0:
            self.fail(field, f"must be >= 0, got {value}")
        return value

    def require_value(self, field: str, allowed, why: str, default=None):
        """Refuse a field whose value (absent/null -> default) is not one of `allowed`."""
        value = self.cfg.get(field, default)
        if value is None:
            value = default
        if value not in allowed:
            shown = " or ".join(json.dumps(a) for a in allowed)
            self.fail(field, f"{json.dumps(value)} is not supported ({why}); use {shown}")
        return value


def check_layout(cfg, layout: ParallelLayout) -> None:
    """Raise naming the config field a parallel layout does not divide (before any process group
    is built). `cfg` is a family config (module megadiff.models.family lists its fields)."""

    def fail(msg):
        raise ConfigError(f"{cfg.source}: {msg}")

    # a family whose config.json spells a field differently (LLaDA: n_kv_heads) says so
    names = getattr(cfg, "HF_FIELD_NAMES", {})

    def named(field):
        return f"{names.get(field, field)}={getattr(cfg, field)}"

    def options(n, limit=None):
        return ", ".join(str(d) for d in range(1, (limit or n) + 1) if n % d == 0)

    if cfg.num_key_value_heads % layout.tp:
        fail(
            f"{named('num_key_value_heads')} is not divisible by --tp {layout.tp}; "
            f"use --tp {options(cfg.num_key_value_heads)}"
        )
    for field in ("num_attention_heads", "vocab_size", "ffn_hidden_size"):
        if getattr(cfg, field) % layout.tp:
            fail(f"{named(field)} is not divisible by --tp {layout.tp}")
    if cfg.num_experts:
        if cfg.num_experts % layout.ep:
            fail(
                f"{named('num_experts')} is not divisible by --ep {layout.ep}; use --ep {options(cfg.num_experts, 64)}"
            )
        if cfg.moe_ffn_hidden_size % layout.etp:
            fail(f"{named('moe_ffn_hidden_size')} is not divisible by --etp {layout.etp}")
    elif layout.ep > 1:
        fail(f"--ep {layout.ep}: this model has no experts; use --ep 1")
    stages = layout.pp * (layout.vpp or 1)
    if cfg.num_hidden_layers % stages:
        fail(f"{named('num_hidden_layers')} is not divisible by pp*vpp={stages}")
    if layout.vpp and layout.pp < 2:
        fail("virtual pipeline parallelism (--vpp) needs --pp >= 2")
