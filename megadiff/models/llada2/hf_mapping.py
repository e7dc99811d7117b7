"""LLaDA2 parameter table: HF (split-expert) tensor names <-> megatron-core parameter names.

Read the table top to bottom: each row names a megatron-core parameter (global layer / expert
index), the HF tensors it is made of, how to transform between the two, and how the full tensor
is split over tensor parallel ranks. It is also the one source of both name sets megatron-core
uses, for the local spec (torch modules) and the Transformer Engine spec (fused norm+linear,
grouped-GEMM experts): the parameter names (`mcore` / `te_mcore`) and the dist-checkpoint keys
(`key` / `te_key`). The two specs' checkpoints differ in one tensor key, the pre-MLP norm of MoE
layers (TE keeps the norm module there, the local spec saves it under the fused name), and in the
`_extra_state` objects only TE modules have (e.g. TE's core attention; see megadiff.checkpoint.dist
for how loading treats them). Everything else in this module applies the table:

- `hf_dims` / `row_instances` / `expected_hf_shapes`: every HF tensor of a config with its shape,
  from the rows' shape rules (the checkpoint keys: megadiff.models.llada2.checkpoint_keys).
- `full_mcore_from_hf` / `hf_from_full_mcore`: one row's transform, on whole tensors.
- `shard` / `unshard`: one row's TP (or expert-TP) split.
- `global_name` / `local_params`: megatron-core's per-rank names (local layer index within a
  pipeline chunk, local expert index within an EP rank) -> the global names the table uses.
- `load_hf_into_model` and `gather_hf_state`: whole-model loading and gathering at any layout.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# How a full megatron-core tensor is divided over its tensor-parallel group.
REPLICATED, ROWS, COLS, GATED_ROWS = "replicated", "rows", "cols", "gated_rows"


@dataclass(frozen=True)
class Rule:
    mcore: str  # global megatron-core name, {layer} / {expert} placeholders
    hf: tuple[str, ...]  # HF tensor names it is built from
    split: str = REPLICATED  # TP split of the megatron-core tensor
    transform: str = "copy"  # "copy" | "qkv" (regroup per KV group) | "concat" (gate;up)
    expert: bool = False  # expert weight: split over expert-TP, placed by EP
    te_mcore: str | None = None  # the name under the Transformer Engine spec, if different
    key: str | None = None  # dist-checkpoint key under the local spec, if not `mcore`
    te_key: str | None = None  # dist-checkpoint key under the TE spec, if not `key`
    layers: str = "all"  # "dense" / "moe": a row of that kind of decoder layer only
    shapes: tuple[tuple[str, ...], ...] = ()  # each HF tensor's shape, in `hf_dims` names

    def checkpoint_key(self, spec: str) -> str:
        """The dist-checkpoint key pattern of this row under `spec` ("local" or "te")."""
        local = self.key or self.mcore
        return (self.te_key or local) if spec == TE else local


LOCAL, TE = "local", "te"
SPECS = (LOCAL, TE)
DENSE, MOE = "dense", "moe"
L = "decoder.layers.{layer}."
H = "model.layers.{layer}."
# Shapes name the dims of `hf_dims(config)`; a row with a zero-sized dim is absent from the
# checkpoint (shared experts when num_shared_experts is 0).
V_H, H_, D_ = ("vocab", "hidden"), ("hidden",), ("head_dim",)
TABLE: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.word_embeddings.weight",), ROWS, shapes=(V_H,)),
    # Both specs save the input norm under its TE (fused into linear_qkv) name.
    Rule(
        L + "input_layernorm.weight",
        (H + "input_layernorm.weight",),
        te_mcore=L + "self_attention.linear_qkv.layer_norm_weight",
        key=L + "self_attention.linear_qkv.layer_norm_weight",
        shapes=(H_,),
    ),
    Rule(
        L + "self_attention.linear_qkv.weight",
        (H + "attention.query_key_value.weight",),
        ROWS,
        "qkv",
        shapes=(("qkv_rows", "hidden"),),
    ),
    Rule(L + "self_attention.q_layernorm.weight", (H + "attention.query_layernorm.weight",), shapes=(D_,)),
    Rule(L + "self_attention.k_layernorm.weight", (H + "attention.key_layernorm.weight",), shapes=(D_,)),
    Rule(
        L + "self_attention.linear_proj.weight",
        (H + "attention.dense.weight",),
        COLS,
        shapes=(("hidden", "attention_out"),),
    ),
    # Pre-MLP norm. Dense layers (first_k_dense_replace): fused into fc1 under TE, saved under that
    # name by both specs. MoE layers: TE keeps a norm module and saves it under its own name; the
    # local spec maps it to the fused name there too (TransformerLayer sharded_state_dict_keys_map).
    Rule(
        L + "pre_mlp_layernorm.weight",
        (H + "post_attention_layernorm.weight",),
        layers=DENSE,
        te_mcore=L + "mlp.linear_fc1.layer_norm_weight",
        key=L + "mlp.linear_fc1.layer_norm_weight",
        shapes=(H_,),
    ),
    Rule(
        L + "pre_mlp_layernorm.weight",
        (H + "post_attention_layernorm.weight",),
        layers=MOE,
        key=L + "mlp.linear_fc1.layer_norm_weight",
        te_key=L + "pre_mlp_layernorm.weight",
        shapes=(H_,),
    ),
    Rule(
        L + "mlp.linear_fc1.weight",
        (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
        GATED_ROWS,
        "concat",
        layers=DENSE,
        shapes=(("ffn", "hidden"), ("ffn", "hidden")),
    ),
    Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), COLS, layers=DENSE, shapes=(("hidden", "ffn"),)),
    # MoE layers. Routed experts: both specs save one [E, ...] tensor per weight of a layer
    # (SequentialMLP's and TEGroupedMLP's sharded state dicts are interchangeable).
    Rule(L + "mlp.router.weight", (H + "mlp.gate.weight",), layers=MOE, shapes=(("experts", "hidden"),)),
    Rule(L + "mlp.router.expert_bias", (H + "mlp.gate.expert_bias",), layers=MOE, shapes=(("experts",),)),
    Rule(
        L + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        (H + "mlp.experts.{expert}.gate_proj.weight", H + "mlp.experts.{expert}.up_proj.weight"),
        GATED_ROWS,
        "concat",
        expert=True,
        te_mcore=L + "mlp.experts.linear_fc1.weight{expert}",
        key=L + "mlp.experts.experts.linear_fc1.weight",
        layers=MOE,
        shapes=(("expert_ffn", "hidden"), ("expert_ffn", "hidden")),
    ),
    Rule(
        L + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
        (H + "mlp.experts.{expert}.down_proj.weight",),
        COLS,
        expert=True,
        te_mcore=L + "mlp.experts.linear_fc2.weight{expert}",
        key=L + "mlp.experts.experts.linear_fc2.weight",
        layers=MOE,
        shapes=(("hidden", "expert_ffn"),),
    ),
    Rule(
        L + "mlp.shared_experts.linear_fc1.weight",
        (H + "mlp.shared_experts.gate_proj.weight", H + "mlp.shared_experts.up_proj.weight"),
        GATED_ROWS,
        "concat",
        layers=MOE,
        shapes=(("shared_ffn", "hidden"), ("shared_ffn", "hidden")),
    ),
    Rule(
        L + "mlp.shared_experts.linear_fc2.weight",
        (H + "mlp.shared_experts.down_proj.weight",),
        COLS,
        layers=MOE,
        shapes=(("hidden", "shared_ffn"),),
    ),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), shapes=(H_,)),
    Rule("output_layer.weight", ("lm_head.weight",), ROWS, shapes=(V_H,)),
)


def _pattern(name: str) -> "re.Pattern":
    escaped = re.escape(name).replace(r"\{layer\}", r"(?P<layer>\d+)")
    return re.compile("^" + escaped.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


_MCORE_PATTERNS = [(_pattern(r.mcore), r) for r in TABLE] + [(_pattern(r.te_mcore), r) for r in TABLE if r.te_mcore]


def rule_for(mcore_name: str) -> tuple[Rule, dict[str, int]]:
    """The table row for a global megatron-core parameter name (either spec), with its layer /
    expert indices. (The two pre-MLP norm rows differ only in checkpoint keys; either serves.)"""
    for pattern, rule in _MCORE_PATTERNS:
        m = pattern.match(mcore_name)
        if m:
            return rule, {k: int(v) for k, v in m.groupdict().items()}
    raise KeyError(f"no LLaDA2 mapping for megatron-core parameter '{mcore_name}'")


def hf_names(rule: Rule, index: dict[str, int]) -> list[str]:
    return [n.format(**index) for n in rule.hf]


def hf_dims(cfg: dict) -> dict[str, int]:
    """The sizes the table's `shapes` name, from HF config fields."""
    h, nq, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nq
    return {
        "vocab": cfg["vocab_size"],
        "hidden": h,
        "head_dim": d,
        "qkv_rows": (nq + 2 * nkv) * d,
        "attention_out": nq * d,
        "ffn": cfg["intermediate_size"] if cfg.get("first_k_dense_replace", 0) else 0,
        "expert_ffn": cfg["moe_intermediate_size"],
        "shared_ffn": cfg["moe_intermediate_size"] * cfg.get("num_shared_experts", 0),
        "experts": cfg["num_experts"],
    }


@dataclass(frozen=True)
class RowInstance:
    """One table row at one layer / expert of a config: its HF names and their shapes."""

    rule: Rule
    layer: int | None
    expert: int | None
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]


def row_instances(cfg: dict) -> list[RowInstance]:
    """Every table row instance a config has, ordered embedding, layer 0..L-1 (table order,
    experts in order within a row), final norm, output layer: together, every HF tensor."""
    dims = hf_dims(cfg)
    first_moe, experts = cfg.get("first_k_dense_replace", 0), cfg["num_experts"]
    out: list[RowInstance] = []

    def add(rule, layer=None, expert=None):
        if layer is not None and rule.layers != "all" and rule.layers != (DENSE if layer < first_moe else MOE):
            return
        shapes = tuple(tuple(dims[d] for d in shape) for shape in rule.shapes)
        if any(0 in shape for shape in shapes):
            return
        index = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
        out.append(RowInstance(rule, layer, expert, tuple(hf_names(rule, index)), shapes))

    global_rules = [r for r in TABLE if "{layer}" not in r.mcore]
    layer_rules = [r for r in TABLE if "{layer}" in r.mcore]
    add(global_rules[0])  # embedding; final norm and output layer come last
    for layer in range(cfg["num_hidden_layers"]):
        for rule in layer_rules:
            for expert in range(experts) if rule.expert else [None]:
                add(rule, layer, expert)
    for rule in global_rules[1:]:
        add(rule)
    return out


def expected_hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a split-expert LLaDA2 checkpoint with its shape, from config fields:
    global tensors first, then layer by layer, a layer's routed experts one expert at a time."""
    rows = row_instances(cfg)
    position = {rule: i for i, rule in enumerate(TABLE)}
    first_expert_row = min(position[r] for r in TABLE if r.expert)

    def order(row: RowInstance):
        p = position[row.rule]
        if row.layer is None:
            return (-1, p, 0, p)
        return (row.layer, first_expert_row if row.rule.expert else p, row.expert or 0, p)

    return {name: shape for row in sorted(rows, key=order) for name, shape in zip(row.hf, row.hf_shapes, strict=True)}


# ---- transforms on whole tensors -------------------------------------------------------------


def _qkv_hf_to_mcore(w, nq, nkv, d):
    """HF rows [all q | all k | all v] -> megatron-core rows per KV group [q heads, k, v]."""
    q, k, v = w.split([nq * d, nkv * d, nkv * d])
    groups = [q.view(nkv, nq // nkv * d, -1), k.view(nkv, d, -1), v.view(nkv, d, -1)]
    return torch.cat(groups, dim=1).reshape(-1, w.shape[-1])


def _qkv_mcore_to_hf(w, nq, nkv, d):
    q, k, v = w.view(nkv, (nq // nkv + 2) * d, -1).split([nq // nkv * d, d, d], dim=1)
    return torch.cat([t.reshape(-1, w.shape[-1]) for t in (q, k, v)])


def full_mcore_from_hf(rule: Rule, tensors: list[torch.Tensor], cfg) -> torch.Tensor:
    if rule.transform == "qkv":
        return _qkv_hf_to_mcore(tensors[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    if rule.transform == "concat":
        return torch.cat(tensors, dim=0)
    return tensors[0]


def hf_from_full_mcore(rule: Rule, full: torch.Tensor, cfg) -> list[torch.Tensor]:
    if rule.transform == "qkv":
        return [_qkv_mcore_to_hf(full, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)]
    if rule.transform == "concat":
        return list(full.chunk(2, dim=0))
    return [full]


# ---- tensor-parallel split -------------------------------------------------------------------


def shard(rule: Rule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full megatron-core tensor (gated fc1 keeps [gate_r; up_r])."""
    if size == 1 or rule.split == REPLICATED:
        return full
    if rule.split == ROWS:
        return full.chunk(size, dim=0)[rank]
    if rule.split == COLS:
        return full.chunk(size, dim=1)[rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    if len(shards) == 1 or rule.split == REPLICATED:
        return shards[0]
    if rule.split == ROWS:
        return torch.cat(shards, dim=0)
    if rule.split == COLS:
        return torch.cat(shards, dim=1)
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


# ---- per-rank names ----------------------------------------------------------------------------

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(local_experts\.|linear_fc[12]\.weight)(\d+)")


def global_name(chunk, local_name: str, ep_rank: int, experts_per_rank: int) -> str:
    """Rename a chunk's parameter from local layer / expert indices to global ones."""
    m = _LOCAL_LAYER.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1  # layer_number is 1-based
    name = f"decoder.layers.{layer}." + local_name[m.end() :]
    if ".mlp.experts." in name:
        name = _LOCAL_EXPERT.sub(lambda e: f"{e.group(1)}{ep_rank * experts_per_rank + int(e.group(2))}", name)
    return name


def local_params(chunks, ep_rank: int, experts_per_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(global name, tensor) of every mapped parameter and the expert-bias buffers on this rank."""
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap DDP / Float16Module
        while hasattr(module, "module") and not hasattr(module, "decoder"):
            module = module.module
        items = list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if n.endswith("router.expert_bias")
        ]
        for name, tensor in items:
            yield global_name(module, name, ep_rank, experts_per_rank), tensor


def _ranks():
    # megatron-core (about 1 s) only with a model: the converters and the sampler read the table
    from megatron.core import parallel_state as ps

    return dict(
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
    )


def load_hf_into_model(chunks, get_hf: Callable[[str], torch.Tensor], cfg) -> int:
    """Copy HF tensors (fetched one at a time by name) into this rank's parameters.
    Returns the number of parameters loaded; every parameter must be covered by the table."""
    r = _ranks()
    experts_per_rank = cfg.num_experts // r["ep"][1]
    count = 0
    with torch.no_grad():
        for name, param in local_params(chunks, r["ep"][0], experts_per_rank):
            rule, index = rule_for(name)
            full = full_mcore_from_hf(rule, [get_hf(n) for n in hf_names(rule, index)], cfg)
            rank, size = r["etp"] if rule.expert else r["tp"]
            piece = shard(rule, full, rank, size)
            if piece.shape != param.shape:
                raise ValueError(
                    f"{name}: HF tensors {hf_names(rule, index)} give shape {list(piece.shape)} on "
                    f"this rank, the model expects {list(param.shape)}"
                )
            param.copy_(piece.to(param.dtype))
            count += 1
    return count


def gather_hf_state(chunks, cfg, value: Callable[[torch.Tensor], torch.Tensor] = lambda p: p.detach()):
    """Full HF-named tensors of the whole model, on every rank, from all TP/ETP/EP/PP shards.

    `value(param)` picks what to gather (the weight by default; e.g. `lambda p: p.main_grad`).
    Meant for tests and small models: it moves every tensor through all_gather_object."""
    # megatron-core (about 1 s) only with a model: the converters and the sampler read the table
    from megatron.core import parallel_state as ps

    r = _ranks()
    experts_per_rank = cfg.num_experts // r["ep"][1]
    mine: dict[str, torch.Tensor] = {}
    for name, param in local_params(chunks, r["ep"][0], experts_per_rank):
        rule, index = rule_for(name)
        group = ps.get_expert_tensor_parallel_group() if rule.expert else ps.get_tensor_model_parallel_group()
        rank, size = r["etp"] if rule.expert else r["tp"]
        local = value(param).detach().float().contiguous()
        if size > 1 and rule.split != REPLICATED:
            pieces = [torch.empty_like(local) for _ in range(size)]
            torch.distributed.all_gather(pieces, local, group=group)
            full = unshard(rule, pieces)
        else:
            full = local
        if rank == 0:
            for hf_name, tensor in zip(hf_names(rule, index), hf_from_full_mcore(rule, full, cfg), strict=True):
                mine[hf_name] = tensor.clone()
    everyone: list[dict[str, torch.Tensor]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        merged.update(part)
    return merged
