"""LLaDA-MoE's router with expert bias, as a megatron-core TopKRouter.

The public code (LLaDAMoESparseMoeBlock.forward) adds the expert bias to the softmax
probabilities, takes the top-k of the sum, and uses those biased values as the experts' weights,
unnormalised. megatron-core's own expert bias does something else (sigmoid scores only; the bias
selects experts but stays out of the weights), so this router keeps the bias itself, as the
buffer `expert_bias` (fp32, like megatron-core's, so checkpoints name it the same), and megatron-core
is configured without one (no bias updates either: fine-tuning keeps the released bias).
Without expert bias the family uses megatron-core's TopKRouter (softmax before top-k) unchanged.
"""

import torch
from megatron.core.transformer.moe.router import TopKRouter


class ProbabilityBiasRouter(TopKRouter):
    """Top-k of softmax(logits) + expert_bias; the chosen values are the weights."""

    def __init__(self, config, pg_collection=None, **kwargs):  # 0.17+ adds is_mtp_layer
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        del self.expert_bias  # TopKRouter's None placeholder (its own bias is off)
        self.register_buffer(
            "expert_bias", torch.zeros(config.num_moe_experts, dtype=torch.float32, device=self.weight.device)
        )

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        """-> (probs [tokens, experts], routing_map [tokens, experts] bool), as TopKRouter.routing."""
        logits = logits.view(-1, self.config.num_moe_experts)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32) + self.expert_bias.float()
        weights, chosen = torch.topk(scores, k=self.topk, dim=-1)
        probs = torch.zeros_like(logits).scatter(1, chosen, weights.type_as(logits))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        return probs, routing_map
