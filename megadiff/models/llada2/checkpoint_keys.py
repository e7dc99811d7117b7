"""Where each row of the LLaDA2 parameter TABLE lives in a megatron-core dist checkpoint.

megatron-core saves under Transformer-Engine-compatible keys whatever spec built the model (the
input and pre-MLP norms under their fused-linear names, the routed experts of a layer stacked into
one [E, ...] tensor per weight), except for the pre-MLP norm of MoE layers, which a TE model saves
under its own name. The table (`Rule.key` / `Rule.te_key`) holds both key sets. A stored tensor is
the full megatron-core tensor at TP=1 (TP shards concatenated, gated fc1 as [gate; up] over all
ranks), so `hf_from_full_mcore` applies to it directly, whatever layout wrote it.

`units_for(hf_config, spec)` lists, in output order, every table row instance a config has, with
its HF names and shapes (from the table's shape rules) and checkpoint location: the plan that
mcore -> HF conversion reads from.
`checkpoint_spec` tells which spec's keys a checkpoint holds; `other_spec_keys` / `key_in_other_spec`
translate keys (loading a checkpoint written with the other spec, writing TE names).
"""

from dataclasses import dataclass

from .hf_mapping import LOCAL, SPECS, TE, Rule, row_instances


@dataclass(frozen=True)
class Unit:
    """One table row instance: the HF tensors of one megatron-core tensor and where it is stored."""

    rule: Rule
    layer: int | None
    expert: int | None
    hf: tuple[str, ...]  # HF names, in the row's order
    hf_shapes: tuple[tuple[int, ...], ...]
    key: str  # dist-checkpoint key
    full_shape: tuple[int, ...]  # the full megatron-core tensor (one expert's, for experts)

    @property
    def index(self) -> dict[str, int]:
        out = {}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.expert is not None:
            out["expert"] = self.expert
        return out


def checkpoint_key(rule: Rule, layer: int | None, spec: str = LOCAL) -> str:
    pattern = rule.checkpoint_key(spec)
    return pattern.format(layer=layer) if layer is not None else pattern


def _full_shape(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if rule.transform == "concat":
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    return tuple(shapes[0])


def units_for(hf_config: dict, spec: str = LOCAL) -> list[Unit]:
    """Every table row instance of a config (hf_mapping.row_instances: embedding, layer 0..L-1,
    final norm, output layer), with its checkpoint key under `spec` ("local" or "te"). Together
    they cover exactly `expected_hf_shapes(config)`."""
    if spec not in SPECS:
        raise ValueError(f"spec {spec!r} is not one of {', '.join(SPECS)}")
    return [
        Unit(
            row.rule,
            row.layer,
            row.expert,
            row.hf,
            row.hf_shapes,
            checkpoint_key(row.rule, row.layer, spec),
            _full_shape(row.rule, list(row.hf_shapes)),
        )
        for row in row_instances(hf_config)
    ]


def stored_shape(unit: Unit, hf_config: dict) -> tuple[int, ...]:
    """Global shape of the checkpoint tensor holding `unit` (experts stacked on a leading axis)."""
    if unit.expert is not None:
        return (hf_config["num_experts"],) + unit.full_shape
    return unit.full_shape


def checkpoint_spec(stored_keys, hf_config: dict, recorded: str | None = None) -> str:
    """The spec ("local" / "te") whose tensor keys `stored_keys` hold for this config: the recorded
    one (megadiff.json 'spec') first, then the other. Raises KeyError naming the first key of the
    recorded (else local) spec that is missing when neither fits."""
    order = [recorded] + [s for s in SPECS if s != recorded] if recorded in SPECS else list(SPECS)
    stored = set(stored_keys)
    for spec in order:
        if all(u.key in stored for u in units_for(hf_config, spec)):
            return spec
    missing = next(u for u in units_for(hf_config, order[0]) if u.key not in stored)
    raise KeyError(missing.key)


def other_spec_keys(hf_config: dict) -> dict[str, str]:
    """Checkpoint key -> the key of the same tensor under the other spec, for every tensor the two
    specs name differently (both directions; for LLaDA2 the pre-MLP norm of each MoE layer)."""
    out: dict[str, str] = {}
    for local, te in zip(units_for(hf_config, LOCAL), units_for(hf_config, TE), strict=True):
        if local.key != te.key:
            out[local.key], out[te.key] = te.key, local.key
    return out


def key_in_other_spec(key: str, renames: dict[str, str]) -> str | None:
    """`key` (a model key, or one that embeds it, like an optimizer-state key) under the other spec,
    from `other_spec_keys(config)`; None when both specs store it under the same key."""
    at = key.find("decoder.layers.")
    if at < 0 or key[at:] not in renames:
        return None
    return key[:at] + renames[key[at:]]
