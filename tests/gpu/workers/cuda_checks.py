"""torchrun worker for tests/gpu: megatron-core LLaDA2 on CUDA (NCCL), one process.

--check logits: the tiny LLaDA2 built on the GPU in fp32 and in bf16, fed host inputs through
    full_logits (which moves them to the run device), vs the fp32 reference model on the CPU; a
    plain row and a row with an arbitrary mask and repeated positions; the masked-diffusion loss
    of those logits too; and the reference itself in bf16 against fp32 (bf16's own error).
    Writes {"fp32" | "bf16" | "reference_bf16": {"max_abs", "mean_abs", "loss_rel"}, "ref_max_abs"}.
--check flex: FlexCoreAttention (compiled flex_attention: Triton on CUDA) vs megatron-core's
    DotProductAttention with the equivalent dense mask, on the GPU, in fp32 and bf16, each against
    dense in fp32 (and dense in bf16 against it): outputs and q/k/v gradients for packed documents
    and block diffusion. Writes {mask: {"fp32" | "bf16" | "dense_bf16": {"out", "grad"}, ...}}.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.diffusion.loss import masked_diffusion_loss  # noqa: E402
from megadiff.hf import build_reference_model  # noqa: E402
from megadiff.models.common.logits import full_logits  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.hf_mapping import load_hf_into_model  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel, run_device  # noqa: E402

S = 32


def logits_errors():
    """Logits and the masked-diffusion loss of the megatron-core model on the GPU, fp32 and bf16, vs
    the fp32 reference on the CPU; also the reference's own error in bf16 (the yardstick of bf16)."""
    cfg_dict = preset("tiny")
    reference = build_reference_model(cfg_dict, seed=0)
    reference_bf16 = build_reference_model(cfg_dict, seed=0, dtype=torch.bfloat16)  # the same weights, rounded
    state = reference.state_dict()
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    half = torch.arange(S // 2)
    allowed = (torch.rand(1, S, S, generator=g) > 0.3) | torch.eye(S, dtype=torch.bool)
    rows = [(torch.arange(S)[None], None), (torch.cat([half, half])[None], allowed)]
    targets = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    masked = torch.rand(1, S, generator=g) < 0.5

    def loss(logits):
        t, answer = torch.full((1, S), 0.5), torch.ones(1, S, dtype=torch.bool)
        return float(masked_diffusion_loss(logits.float().cpu(), targets, masked, t, answer)[0])

    with torch.no_grad():
        wanted = [reference(ids, pos, mask).logits.float() for pos, mask in rows]
        in_bf16 = [reference_bf16(ids, pos, mask).logits.float() for pos, mask in rows]

    def errors(got):
        return {
            "max_abs": max(float((a.cpu() - w).abs().max()) for a, w in zip(got, wanted, strict=True)),
            "mean_abs": max(float((a.cpu() - w).abs().mean()) for a, w in zip(got, wanted, strict=True)),
            "loss_rel": max(abs(loss(a) - loss(w)) / loss(w) for a, w in zip(got, wanted, strict=True)),
        }

    result = {"ref_max_abs": max(float(w.abs().max()) for w in wanted), "reference_bf16": errors(in_bf16)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        chunks = build_model(cfg, ParallelLayout(), dtype)
        assert all(p.device == run_device() for c in chunks for p in c.parameters()), "model is not on the GPU"
        load_hf_into_model(chunks, lambda n: state[n], cfg)
        result[name] = errors([full_logits(chunks, ids, pos, mask) for pos, mask in rows])
    return result


def attention_and_grads(attention, qkv, weights, mask, dtype):
    """(output, q/k/v gradients of sum(output * weights)) with q, k, v cast to `dtype`, in fp32."""
    inputs = [x.to(dtype).requires_grad_() for x in qkv]
    out = attention(*inputs, mask)
    grads = torch.autograd.grad((out.float() * weights).sum(), inputs)
    return out.float(), [x.float() for x in grads]


def errors_against(want, got) -> dict:
    return {
        "out": float((got[0] - want[0]).abs().max()),
        "grad": max(float((a - e).abs().max()) for a, e in zip(got[1], want[1], strict=True)),
    }


def flex_errors():
    """Compiled flex attention vs megatron-core's dense attention on the GPU, in fp32 and in bf16:
    each against dense in fp32 (in bf16, also dense in bf16 against it: the yardstick)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megadiff.diffusion.block_mask import block_mask_for
    from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
    from megadiff.models.common.attention import FlexCoreAttention
    from megadiff.models.common.gpt import mcore_attention_mask

    device = run_device()
    heads, groups, dim, b, length = 4, 2, 64, 2, 320
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=dim,
        attention_dropout=0.0,
        masked_softmax_fusion=False,
    )
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self")
    dense, flex = DotProductAttention(**args).to(device), FlexCoreAttention(**args).to(device)
    doc = torch.zeros(b, length, dtype=torch.long, device=device)  # row 0: one document,
    doc[1, length // 3 :] = 1  # row 1: two (so BlockMasks hold full and partial tiles)
    pos = torch.arange(length, device=device).repeat(b, 1)
    pos[1, length // 3 :] -= length // 3  # positions restart with the second document
    cases = {
        "packed_docs": (full_attention_mask(doc), block_mask_for(doc, pos, "full"), length),
        "block_diffusion": (block_diffusion_mask(doc, pos, 32), block_mask_for(doc, pos, "bd", 32), 2 * length),
    }
    g = torch.Generator(device=device).manual_seed(3)
    result = {}
    for name, (allowed, block_mask, s) in cases.items():
        qkv = [torch.randn(s, b, n, dim, device=device, generator=g) for n in (heads, groups, groups)]
        w = torch.randn(s, b, heads * dim, device=device, generator=g)
        want = attention_and_grads(dense, qkv, w, mcore_attention_mask(allowed), torch.float32)
        result[name] = {
            "fp32": errors_against(want, attention_and_grads(flex, qkv, w, block_mask, torch.float32)),
            "bf16": errors_against(want, attention_and_grads(flex, qkv, w, block_mask, torch.bfloat16)),
            "dense_bf16": errors_against(
                want, attention_and_grads(dense, qkv, w, mcore_attention_mask(allowed), torch.bfloat16)
            ),
            "out_max_abs": float(want[0].abs().max()),
            "grad_max_abs": max(float(e.abs().max()) for e in want[1]),
        }
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", choices=["logits", "flex"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    if run_device().type != "cuda":
        raise SystemExit(f"cuda_checks.py needs CUDA; the run device is {run_device()}")
    initialize_parallel(ParallelLayout())
    result = logits_errors() if args.check == "logits" else flex_errors()
    print(json.dumps(result), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
