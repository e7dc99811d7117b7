"""The sizes the planner reads, from any model family's config (megadiff.models.family).

Most come from the attributes every family config has (hidden size, heads, layers,
moe_layer_pattern, ffn sizes, ...). Whether a layer has QK-norm, a shared expert (and its size) or
a router expert-bias buffer is what the family's mapping table says: an absent tensor is an
instance the table does not list for that config. So the planner counts exactly the tensors the
converters and the reference model have, for every family, without naming one.
"""

from dataclasses import dataclass
from functools import lru_cache

from megadiff.models.common import mcore_params as P
from megadiff.models.registry import family_of


@dataclass(frozen=True)
class ModelShape:
    vocab: int  # rows of the embedding and of the output layer
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    moe_pattern: tuple[int, ...]  # per layer: 0 dense, 1 MoE
    ffn: int  # a dense layer's FFN size
    experts: int  # routed experts of a MoE layer (0: dense model)
    top_k: int  # routed experts per token
    expert_ffn: int  # one routed expert's FFN size
    shared_ffn: int  # the shared expert's FFN size in a MoE layer (0: none)
    qk_norm: bool  # per-head RMSNorm of q and k
    expert_bias: bool  # the router holds an fp32 expert-bias buffer

    def is_moe(self, layer: int) -> bool:
        return bool(self.moe_pattern[layer])

    @property
    def moe_layers(self) -> int:
        return sum(self.moe_pattern)

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers


@lru_cache(maxsize=64)
def model_shape(model) -> ModelShape:
    """The planner's view of a family config (a validated, frozen config: hashable)."""
    instances = family_of(model).mapping.instances(model)
    params = {inst.mapping.param.name: inst for inst in instances}  # one instance per slot suffices
    shared = next((i for i in instances if i.mapping.param is P.SHARED_FC1), None)
    pattern = tuple(int(x) for x in model.moe_layer_pattern)
    experts = model.num_experts if any(pattern) else 0
    return ModelShape(
        vocab=model.vocab_size,
        hidden=model.hidden_size,
        layers=model.num_hidden_layers,
        heads=model.num_attention_heads,
        kv_heads=model.num_key_value_heads,
        head_dim=model.head_dim,
        rotary_dim=model.rotary_dim,
        moe_pattern=pattern,
        ffn=model.ffn_hidden_size,
        experts=experts,
        top_k=model.num_experts_per_tok if experts else 0,  # only MoE families have it
        expert_ffn=model.moe_ffn_hidden_size if experts else 0,
        shared_ffn=shared.full_shape[0] // 2 if shared else 0,  # fc1 is [gate; up]
        qk_norm=P.Q_NORM.name in params,
        expert_bias=P.ROUTER_EXPERT_BIAS.name in params,
    )
