"""The parameters of a megatron-core GPTModel, as every model family's HF mapping sees them.

Every family megadiff trains is a megatron-core `GPTModel`, so the megatron side of an HF mapping is
the same for all of them: one `McoreParam` per parameter slot, holding

- its global name under the local spec (`{layer}` / `{expert}` placeholders) and, where it differs,
  its name under the Transformer Engine spec (fused norm+linear, grouped-GEMM experts);
- its dist-checkpoint keys: megatron-core saves Transformer-Engine-compatible keys whatever spec
  built the model (input and pre-MLP norms under their fused-linear names, a layer's routed experts
  stacked into one [E, ...] tensor per weight), except the pre-MLP norm of MoE layers, which a TE
  model saves under its own name;
- how the full tensor is divided over its tensor-parallel (for experts: expert-tensor-parallel) group;
- which decoder layers have it (dense, MoE or all) and whether it is a routed-expert weight (placed
  by expert parallelism: local expert e on EP rank r is global expert r * E / EP + e).

A family's mapping table (megadiff.models.common.mapping) pairs these slots with HF tensor names.
"""

from dataclasses import dataclass

import torch

LOCAL, TE = "local", "te"
SPECS = (LOCAL, TE)
ALL, DENSE, MOE = "all", "dense", "moe"


class Split:
    """How a full megatron-core tensor is divided over a tensor-parallel group."""

    name = "replicated"

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """This rank's piece of the full tensor."""
        return full

    def unshard(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece, in rank order."""
        return pieces[0]


class ChunkSplit(Split):
    """Equal consecutive chunks along one dim: dim 0 for column-parallel linears and the
    vocab-parallel embedding / output layer, dim 1 for row-parallel linears."""

    def __init__(self, dim: int, name: str):
        self.dim, self.name = dim, name

    def shard(self, full, rank, size):
        return full if size == 1 else full.chunk(size, dim=self.dim)[rank]

    def unshard(self, pieces):
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


class GatedRowsSplit(Split):
    """A gated MLP's fc1 [gate; up]: each rank holds [gate_r; up_r], its rows of both halves."""

    name = "gated_rows"

    def shard(self, full, rank, size):
        if size == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])

    def unshard(self, pieces):
        if len(pieces) == 1:
            return pieces[0]
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


REPLICATED, ROWS, COLS, GATED_ROWS = Split(), ChunkSplit(0, "rows"), ChunkSplit(1, "cols"), GatedRowsSplit()


@dataclass(frozen=True)
class McoreParam:
    """One parameter slot of a GPTModel (module docstring)."""

    name: str  # global name under the local spec
    split: Split = REPLICATED
    te_name: str | None = None  # name under the TE spec, if different
    key: str | None = None  # dist-checkpoint key under the local spec, if not `name`
    te_key: str | None = None  # dist-checkpoint key under the TE spec, if not `key`
    layers: str = ALL  # ALL, or DENSE / MOE: only decoder layers of that kind have it
    expert: bool = False  # a routed-expert weight: split over expert-TP, placed by EP

    def checkpoint_key(self, spec: str) -> str:
        """The dist-checkpoint key pattern under `spec` ("local" or "te")."""
        local = self.key or self.name
        return (self.te_key or local) if spec == TE else local


L = "decoder.layers.{layer}."
EMBEDDING = McoreParam("embedding.word_embeddings.weight", ROWS)
# Both specs save the input norm under its TE name (fused into linear_qkv).
INPUT_NORM = McoreParam(
    L + "input_layernorm.weight",
    te_name=L + "self_attention.linear_qkv.layer_norm_weight",
    key=L + "self_attention.linear_qkv.layer_norm_weight",
)
LINEAR_QKV = McoreParam(L + "self_attention.linear_qkv.weight", ROWS)  # rows grouped per KV group
Q_NORM = McoreParam(L + "self_attention.q_layernorm.weight")
K_NORM = McoreParam(L + "self_attention.k_layernorm.weight")
LINEAR_PROJ = McoreParam(L + "self_attention.linear_proj.weight", COLS)
# Pre-MLP norm. Dense layers: fused into fc1 under TE, saved under that name by both specs. MoE
# layers: TE keeps a norm module and saves it under its own name; the local spec maps it to the
# fused name there too (TransformerLayer sharded_state_dict_keys_map).
DENSE_PRE_MLP_NORM = McoreParam(
    L + "pre_mlp_layernorm.weight",
    te_name=L + "mlp.linear_fc1.layer_norm_weight",
    key=L + "mlp.linear_fc1.layer_norm_weight",
    layers=DENSE,
)
MOE_PRE_MLP_NORM = McoreParam(
    L + "pre_mlp_layernorm.weight",
    key=L + "mlp.linear_fc1.layer_norm_weight",
    te_key=L + "pre_mlp_layernorm.weight",
    layers=MOE,
)
DENSE_FC1 = McoreParam(L + "mlp.linear_fc1.weight", GATED_ROWS, layers=DENSE)  # [gate; up]
DENSE_FC2 = McoreParam(L + "mlp.linear_fc2.weight", COLS, layers=DENSE)
ROUTER = McoreParam(L + "mlp.router.weight", layers=MOE)
ROUTER_EXPERT_BIAS = McoreParam(L + "mlp.router.expert_bias", layers=MOE)  # a buffer, fp32
# Routed experts: both specs save one [E, ...] tensor per weight of a layer (SequentialMLP's and
# TEGroupedMLP's sharded state dicts are interchangeable).
EXPERT_FC1 = McoreParam(
    L + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
    GATED_ROWS,
    te_name=L + "mlp.experts.linear_fc1.weight{expert}",
    key=L + "mlp.experts.experts.linear_fc1.weight",
    layers=MOE,
    expert=True,
)
EXPERT_FC2 = McoreParam(
    L + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
    COLS,
    te_name=L + "mlp.experts.linear_fc2.weight{expert}",
    key=L + "mlp.experts.experts.linear_fc2.weight",
    layers=MOE,
    expert=True,
)
SHARED_FC1 = McoreParam(L + "mlp.shared_experts.linear_fc1.weight", GATED_ROWS, layers=MOE)
SHARED_FC2 = McoreParam(L + "mlp.shared_experts.linear_fc2.weight", COLS, layers=MOE)
FINAL_NORM = McoreParam("decoder.final_layernorm.weight")
OUTPUT_LAYER = McoreParam("output_layer.weight", ROWS)
