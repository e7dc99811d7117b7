"""Where each row of the LLaDA2 parameter TABLE lives in a megatron-core dist checkpoint.

megatron-core saves under Transformer-Engine-compatible keys whatever spec built the model: the input
and pre-MLP norms under their fused-linear names, and the routed experts of a layer stacked into one
[E, ...] tensor per weight. Every other row is stored under its own global name. A stored tensor is
the full megatron-core tensor at TP=1 (TP shards concatenated, gated fc1 as [gate; up] over all
ranks), so `hf_from_full_mcore` applies to it directly, whatever layout wrote it.

`units_for(hf_config)` lists, in output order, every table row instance a config has, with its HF
names and checkpoint location: the plan that mcore -> HF conversion reads from.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .hf_layout import expected_hf_shapes

from .llada2_mapping import TABLE, Rule, hf_names

L = "decoder.layers.{layer}."
CHECKPOINT_KEYS: Dict[str, str] = {  # TABLE mcore name -> dist-checkpoint key, where they differ
    L + "input_layernorm.weight": L + "self_attention.linear_qkv.layer_norm_weight",
    L + "pre_mlp_layernorm.weight": L + "mlp.linear_fc1.layer_norm_weight",
    L + "mlp.experts.local_experts.{expert}.linear_fc1.weight": L + "mlp.experts.experts.linear_fc1.weight",
    L + "mlp.experts.local_experts.{expert}.linear_fc2.weight": L + "mlp.experts.experts.linear_fc2.weight",
}


@dataclass(frozen=True)
class Unit:
    """One table row instance: the HF tensors of one megatron-core tensor and where it is stored."""

    rule: Rule
    layer: Optional[int]
    expert: Optional[int]
    hf: Tuple[str, ...]               # HF names, in the row's order
    hf_shapes: Tuple[Tuple[int, ...], ...]
    key: str                          # dist-checkpoint key
    full_shape: Tuple[int, ...]       # the full megatron-core tensor (one expert's, for experts)

    @property
    def index(self) -> Dict[str, int]:
        out = {}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.expert is not None:
            out["expert"] = self.expert
        return out


def checkpoint_key(rule: Rule, layer: Optional[int]) -> str:
    pattern = CHECKPOINT_KEYS.get(rule.mcore, rule.mcore)
    return pattern.format(layer=layer) if layer is not None else pattern


def _full_shape(rule: Rule, shapes: List[Tuple[int, ...]]) -> Tuple[int, ...]:
    if rule.transform == "concat":
        return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
    return tuple(shapes[0])


def units_for(hf_config: Dict) -> List[Unit]:
    """Every table row instance of a config, ordered embedding, layer 0..L-1 (table order, experts
    in order), final norm, output layer. Together they cover exactly `expected_hf_shapes(config)`."""
    expected = expected_hf_shapes(hf_config)
    layers, experts = hf_config["num_hidden_layers"], hf_config["num_experts"]
    global_rules = [r for r in TABLE if "{layer}" not in r.mcore]
    layer_rules = [r for r in TABLE if "{layer}" in r.mcore]
    units: List[Unit] = []

    def add(rule, layer=None, expert=None):
        index = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
        names = hf_names(rule, index)
        present = [n in expected for n in names]
        if not any(present):
            return
        if not all(present):
            raise ValueError(f"config gives only some of {names}; the parameter table is inconsistent")
        shapes = tuple(tuple(expected[n]) for n in names)
        units.append(Unit(rule, layer, expert, tuple(names), shapes, checkpoint_key(rule, layer),
                          _full_shape(rule, list(shapes))))

    first, last = global_rules[:1], global_rules[1:]  # embedding | final norm, output layer
    for rule in first:
        add(rule)
    for layer in range(layers):
        for rule in layer_rules:
            if "{expert}" in rule.mcore:
                for expert in range(experts):
                    add(rule, layer, expert)
            else:
                add(rule, layer)
    for rule in last:
        add(rule)
    covered = [n for u in units for n in u.hf]
    if sorted(covered) != sorted(expected):
        raise ValueError(f"parameter table covers {len(covered)} HF tensors, config implies {len(expected)}")
    return units


def stored_shape(unit: Unit, hf_config: Dict) -> Tuple[int, ...]:
    """Global shape of the checkpoint tensor holding `unit` (experts stacked on a leading axis)."""
    if unit.expert is not None:
        return (hf_config["num_experts"],) + unit.full_shape
    return unit.full_shape
