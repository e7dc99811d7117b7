"""Model FLOPs of a training step (real tokens only) and MFU against per-GPU peaks.

The formula (forward + backward = 3x the forward; a multiply-add is 2 FLOPs):

    step FLOPs = 6 * N_body * body_tokens + 6 * N_head * head_tokens + 12 * n_heads * head_dim * L * visible_pairs

- N_body: matmul parameters one token passes through in the decoder (attention q/k/v/o; a dense
  layer's gated MLP 3*h*ffn; a MoE layer's router h*E, its top-k routed experts and shared experts,
  3*h*moe_ffn each). The embedding is a lookup, not a matmul, so it does not count.
- N_head: the LM head, h * vocab.
- body_tokens: the real (non-padding) tokens; block diffusion counts its 2S input ([x_t ; x_0]),
  so twice the real tokens. head_tokens: the same, or only the x_t half with the x_t-only head.
- visible_pairs: the (query, key) pairs the attention mask allows among real tokens, per layer;
  QK^T and PV cost 2 * n_heads * head_dim FLOPs each per pair in the forward.
"""

from dataclasses import dataclass

import torch

from megadiff.models.registry import family_of
from megadiff.training.batch import document_starts, per_document_sum

# Dense (no sparsity) peak TFLOP/s per GPU, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": None},  # no FP8 tensor cores
}


def peak_tflops(gpu_name: str | None, precision: str) -> float | None:
    """The table's peak for a device name such as 'NVIDIA H100 80GB HBM3' (None when unknown)."""
    for key, peaks in PEAK_TFLOPS.items():
        if gpu_name and key in gpu_name.upper():
            return peaks[precision]
    return None


@dataclass(frozen=True)
class ActiveParams:
    body: int  # matmul parameters per token in all decoder layers
    head: int  # LM head


# The megatron-core parameters that are not decoder matmuls (the LM head is counted apart).
_NOT_BODY = ("embedding.word_embeddings.weight", "output_layer.weight")


def active_params(model_cfg, table=None) -> ActiveParams:
    """Matmul parameters per token, from the model family's mapping table `table` (default: that
    of the registered family whose config class `model_cfg` is): every 2-D tensor of the decoder
    (norms, biases are not matmuls), the routed experts scaled by top-k / E."""
    table = table if table is not None else family_of(model_cfg).mapping
    body = routed = 0
    for inst in table.instances(model_cfg):
        if inst.mapping.mcore in _NOT_BODY:
            continue
        n = sum(shape[0] * shape[1] for shape in inst.hf_shapes if len(shape) == 2)
        if inst.expert is None:
            body += n
        else:
            routed += n
    if routed:
        body += routed * model_cfg.num_experts_per_tok // model_cfg.num_experts
    return ActiveParams(body=body, head=model_cfg.hidden_size * model_cfg.vocab_size)


def visible_pairs(doc_lengths: list[int], mode: str, block_size: int) -> int:
    """(query, key) pairs attention computes: full = L^2 per document; block diffusion over
    [x_t ; x_0] with blocks n_1..n_m: x_t->x_t sum n_i^2, x_t->x_0 sum n_i * (n_1+..+n_{i-1}),
    x_0->x_0 sum n_i * (n_1+..+n_i) (megadiff.diffusion.masks.block_diffusion_mask)."""
    total = 0
    for length in doc_lengths:
        if mode == "full":
            total += length * length
            continue
        before = 0
        for start in range(0, length, block_size):
            n = min(block_size, length - start)
            total += n * n + n * before + n * (before + n)
            before += n
    return total


def token_counts(doc_ids: torch.Tensor, sample_ids: torch.Tensor, mode: str, block_size: int):
    """(real tokens, visible pairs) of a [B, S] micro-batch, as 0-dim long tensors on its device.

    Vectorised, without a host read: a document is a run of one doc id within a row (packing
    lays documents out contiguously); its real tokens are those with a sample id >= 0. A real
    token at offset p of a document of length L sees L keys (full attention), or in block
    diffusion 2 * min((p // block + 1) * block, L): its x_t query sees the blocks up to its own
    end e, its x_0 query sees x_0 up to e (visible_pairs' sum, counted per token)."""
    real = sample_ids >= 0
    _, start_col = document_starts(doc_ids)
    lengths = per_document_sum(real, doc_ids)
    before = real.long().cumsum(dim=1) - real.long()  # real tokens before this one in the row
    offset = before - before.gather(1, start_col)  # ... within its document
    if mode == "full":
        seen = lengths
    else:
        block_end = torch.minimum((offset // block_size + 1) * block_size, lengths)
        seen = 2 * block_end
    return real.sum(), torch.where(real, seen, torch.zeros_like(seen)).sum()


def model_flops(model_cfg, real_tokens: int, pairs: int, mode: str, xt_only_head: bool, params=None) -> float:
    """Model FLOPs of `real_tokens` real tokens whose attention sees `pairs` (query, key) pairs
    (`params`: active_params(model_cfg), computed once by the caller)."""
    params = params or active_params(model_cfg)
    attention_per_pair = 12 * model_cfg.num_attention_heads * model_cfg.head_dim * model_cfg.num_hidden_layers
    body_tokens = real_tokens * (2 if mode == "block_diffusion" else 1)
    head_tokens = real_tokens if xt_only_head or mode != "block_diffusion" else body_tokens
    return float(6 * params.body * body_tokens + 6 * params.head * head_tokens + attention_per_pair * pairs)


def step_flops(model_cfg, micro_batches: list[dict], mode: str, block_size: int, xt_only_head: bool) -> float:
    """Model FLOPs of one rank's micro-batches (see the module docstring). Reads the counts: call
    it on the host copy of a batch (the trainer counts each micro-batch there, before moving it)."""
    total = 0.0
    for batch in micro_batches:
        real, pairs = (int(n) for n in token_counts(batch["doc_ids"], batch["sample_ids"], mode, block_size))
        total += model_flops(model_cfg, real, pairs, mode, xt_only_head)
    return total
