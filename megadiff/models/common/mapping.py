"""HF <-> megatron-core parameter mapping objects, and the table a model family makes of them.

A mapping object pairs one megatron-core parameter slot (megadiff.models.common.mcore_params: names,
checkpoint keys, TP split, layer kind, expert flag) with the HF tensors it is made of, and owns the
transform between the two:

    Copy(param, hf)             one HF tensor, unchanged (norms, router, embedding, output layer)
    FusedQKV(param, qkv)        one HF tensor with rows [all q | all k | all v] (LLaDA2)
    QKV(param, q, k, v)         three HF tensors (LLaDA, LLaDA-MoE)
    GatedMLP(param, gate, up)   two HF tensors stacked as [gate; up]

megatron-core's fused `linear_qkv` stores its rows per KV group: for each group g its query heads,
then its key head, then its value head; tensor parallelism splits that layout by groups.

Every object has the same four operations, on tensors:
    to_mcore(hf_tensors, cfg) -> full megatron tensor     to_hf(full, cfg) -> HF tensors
    shard(full, rank, size)   -> this TP rank's piece      unshard(pieces)  -> full tensor
`cfg` is the family's validated config (num_attention_heads, num_key_value_heads, head_dim).

HF names use `{layer}` / `{expert}` placeholders. `shapes` name each HF tensor's dims in the
family's `dims(cfg)` vocabulary; an instance with a zero-sized dim does not exist (e.g. shared
experts when a config has none), which is how one table serves every config of a family.

`MappingTable` lists a family's mappings top to bottom in checkpoint order: global tensors before
the first per-layer mapping come first, those after it (final norm, output layer) come last.
"""

import re
from dataclasses import dataclass

import torch

from .mcore_params import ALL, DENSE, LOCAL, MOE, SPECS, TE, McoreParam


class Mapping:
    """One megatron-core parameter <-> the HF tensors it is made of (module docstring)."""

    transform = "copy"  # what the object does, for reports and tests

    def __init__(self, param: McoreParam, hf: tuple[str, ...], shapes: tuple[tuple[str, ...], ...]):
        if len(hf) != len(shapes):
            raise ValueError(f"{param.name}: {len(hf)} HF names but {len(shapes)} shapes")
        self.param, self.hf, self.shapes = param, tuple(hf), tuple(tuple(s) for s in shapes)

    def __repr__(self):
        return f"{type(self).__name__}({self.param.name} <- {', '.join(self.hf)})"

    @property
    def mcore(self) -> str:
        return self.param.name

    @property
    def expert(self) -> bool:
        return self.param.expert

    def hf_names(self, index: dict[str, int]) -> list[str]:
        return [name.format(**index) for name in self.hf]

    def to_mcore(self, tensors: list[torch.Tensor], cfg) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, full: torch.Tensor, cfg) -> list[torch.Tensor]:
        return [full]

    def full_shape(self, hf_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Shape of the full megatron tensor made of HF tensors of these shapes."""
        return tuple(hf_shapes[0])

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        return self.param.split.shard(full, rank, size)

    def unshard(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self.param.split.unshard(pieces)


class Copy(Mapping):
    def __init__(self, param: McoreParam, hf: str, shape: tuple[str, ...]):
        super().__init__(param, (hf,), (shape,))


def _rows_per_group(cfg) -> tuple[int, int, int]:
    """(query heads per KV group, KV groups, head dim)."""
    return cfg.num_attention_heads // cfg.num_key_value_heads, cfg.num_key_value_heads, cfg.head_dim


def _grouped_qkv(q, k, v, cfg) -> torch.Tensor:
    per_group, groups, d = _rows_per_group(cfg)
    cols = q.shape[-1]
    parts = [q.view(groups, per_group * d, cols), k.view(groups, d, cols), v.view(groups, d, cols)]
    return torch.cat(parts, dim=1).reshape(-1, cols)


def _ungrouped_qkv(full, cfg) -> list[torch.Tensor]:
    per_group, groups, d = _rows_per_group(cfg)
    cols = full.shape[-1]
    q, k, v = full.view(groups, (per_group + 2) * d, cols).split([per_group * d, d, d], dim=1)
    return [t.reshape(-1, cols) for t in (q, k, v)]


class FusedQKV(Mapping):
    """HF rows [all q | all k | all v] in one tensor <-> megatron-core rows per KV group."""

    transform = "qkv"

    def __init__(self, param: McoreParam, qkv: str):
        super().__init__(param, (qkv,), (("qkv_rows", "hidden"),))

    def to_mcore(self, tensors, cfg):
        (w,) = tensors
        heads, groups, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = w.split([heads * d, groups * d, groups * d])
        return _grouped_qkv(q, k, v, cfg)

    def to_hf(self, full, cfg):
        return [torch.cat(_ungrouped_qkv(full, cfg))]


class QKV(Mapping):
    """HF q / k / v projections <-> megatron-core's fused linear_qkv (rows per KV group)."""

    transform = "qkv_split"

    def __init__(self, param: McoreParam, q: str, k: str, v: str):
        shapes = (("attention_out", "hidden"), ("kv_out", "hidden"), ("kv_out", "hidden"))
        super().__init__(param, (q, k, v), shapes)

    def to_mcore(self, tensors, cfg):
        return _grouped_qkv(*tensors, cfg)

    def to_hf(self, full, cfg):
        return _ungrouped_qkv(full, cfg)

    def full_shape(self, hf_shapes):
        return (sum(s[0] for s in hf_shapes),) + tuple(hf_shapes[0][1:])


class GatedMLP(Mapping):
    """HF gate and up projections <-> megatron-core's gated fc1 [gate; up]."""

    transform = "concat"

    def __init__(self, param: McoreParam, gate: str, up: str, rows: str):
        super().__init__(param, (gate, up), ((rows, "hidden"), (rows, "hidden")))

    def to_mcore(self, tensors, cfg):
        return torch.cat(tensors, dim=0)

    def to_hf(self, full, cfg):
        return list(full.chunk(2, dim=0))

    def full_shape(self, hf_shapes):
        return (sum(s[0] for s in hf_shapes),) + tuple(hf_shapes[0][1:])


@dataclass(frozen=True)
class Instance:
    """One mapping at one layer / expert of a config: its HF names and shapes."""

    mapping: Mapping
    layer: int | None
    expert: int | None
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def index(self) -> dict[str, int]:
        return {k: v for k, v in (("layer", self.layer), ("expert", self.expert)) if v is not None}

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The full megatron-core tensor (one expert's, for experts)."""
        return self.mapping.full_shape(list(self.hf_shapes))

    def checkpoint_key(self, spec: str) -> str:
        pattern = self.mapping.param.checkpoint_key(spec)
        return pattern.format(layer=self.layer) if self.layer is not None else pattern


def _pattern(name: str) -> "re.Pattern":
    escaped = re.escape(name).replace(r"\{layer\}", r"(?P<layer>\d+)")
    return re.compile("^" + escaped.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


class MappingTable:
    """A family's mappings, top to bottom in checkpoint order (module docstring).

    `dims(cfg)` gives the sizes the mappings' shapes name; `cfg` also gives num_hidden_layers,
    num_experts and moe_layer_pattern (0 = dense layer, 1 = MoE layer)."""

    def __init__(self, *mappings: Mapping, dims):
        self.mappings, self.dims = tuple(mappings), dims
        per_layer = [i for i, m in enumerate(self.mappings) if "{layer}" in m.mcore]
        first = per_layer[0] if per_layer else len(self.mappings)
        self.before_layers = [m for m in self.mappings[:first] if "{layer}" not in m.mcore]
        self.layer_mappings = [self.mappings[i] for i in per_layer]
        self.after_layers = [m for m in self.mappings[first:] if "{layer}" not in m.mcore]
        self._patterns = [(_pattern(m.mcore), m) for m in self.mappings]
        self._patterns += [(_pattern(m.param.te_name), m) for m in self.mappings if m.param.te_name]

    def __iter__(self):
        return iter(self.mappings)

    def for_mcore_name(self, name: str) -> tuple[Mapping, dict[str, int]]:
        """The mapping of a global megatron-core parameter name (either spec), with its layer /
        expert indices. (Mappings that differ only in checkpoint keys, like the dense and MoE
        pre-MLP norms, transform alike; the first serves.)"""
        for pattern, mapping in self._patterns:
            m = pattern.match(name)
            if m:
                return mapping, {k: int(v) for k, v in m.groupdict().items()}
        raise KeyError(f"no HF mapping for megatron-core parameter '{name}'")

    def instances(self, cfg) -> list[Instance]:
        """Every mapping instance a config has, ordered: global tensors before the layers, layer
        0..L-1 (table order, experts in order within a mapping), global tensors after the layers.
        Together, every HF tensor of the config."""
        dims = self.dims(cfg)
        out: list[Instance] = []

        def add(mapping, layer=None, expert=None):
            if layer is not None and mapping.param.layers != ALL:
                kind = MOE if cfg.moe_layer_pattern[layer] else DENSE
                if mapping.param.layers != kind:
                    return
            shapes = tuple(tuple(dims[d] for d in shape) for shape in mapping.shapes)
            if any(0 in shape for shape in shapes):
                return
            index = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
            out.append(Instance(mapping, layer, expert, tuple(mapping.hf_names(index)), shapes))

        for mapping in self.before_layers:
            add(mapping)
        for layer in range(cfg.num_hidden_layers):
            for mapping in self.layer_mappings:
                for expert in range(cfg.num_experts) if mapping.expert else [None]:
                    add(mapping, layer, expert)
        for mapping in self.after_layers:
            add(mapping)
        return out

    def expected_hf_shapes(self, cfg) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name of a config with its shape: global tensors first, then layer by
        layer, a layer's routed experts one expert at a time (where its first expert mapping is)."""
        position = {id(m): i for i, m in enumerate(self.mappings)}
        expert_positions = [position[id(m)] for m in self.mappings if m.expert]
        first_expert = min(expert_positions) if expert_positions else 0

        def order(inst: Instance):
            p = position[id(inst.mapping)]
            if inst.layer is None:
                return (-1, p, 0, p)
            return (inst.layer, first_expert if inst.mapping.expert else p, inst.expert or 0, p)

        return {
            name: shape
            for inst in sorted(self.instances(cfg), key=order)
            for name, shape in zip(inst.hf, inst.hf_shapes, strict=True)
        }

    def checkpoint_spec(self, stored_keys, cfg, recorded: str | None = None) -> str:
        """The spec ("local" / "te") whose tensor keys `stored_keys` hold for this config: the
        recorded one first, then the other. Raises KeyError naming the first missing key of the
        recorded (else local) spec when neither fits."""
        order = [recorded] + [s for s in SPECS if s != recorded] if recorded in SPECS else list(SPECS)
        stored = set(stored_keys)
        instances = self.instances(cfg)
        for spec in order:
            if all(inst.checkpoint_key(spec) in stored for inst in instances):
                return spec
        missing = next(i.checkpoint_key(order[0]) for i in instances if i.checkpoint_key(order[0]) not in stored)
        raise KeyError(missing)

    def other_spec_keys(self, cfg) -> dict[str, str]:
        """Checkpoint key -> the same tensor's key under the other spec, for every tensor the two
        specs name differently (both directions)."""
        out: dict[str, str] = {}
        for inst in self.instances(cfg):
            local, te = inst.checkpoint_key(LOCAL), inst.checkpoint_key(TE)
            if local != te:
                out[local], out[te] = te, local
        return out
