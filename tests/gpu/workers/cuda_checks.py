"""torchrun worker for tests/gpu: megatron-core LLaDA2 on CUDA (NCCL), one process.

--check logits: the tiny LLaDA2 built on the GPU in fp32 and in bf16, fed host inputs through
    full_logits (which moves them to the run device), vs the fp32 reference model on the CPU; a
    plain row and a row with an arbitrary mask and repeated positions.
    Writes {dtype: {"max_abs": worst max |Δ|, "ref_max_abs": max |reference logit|}}.
--check flex: FlexCoreAttention (compiled flex_attention: Triton on CUDA) vs megatron-core's
    DotProductAttention with the equivalent dense mask, fp32, on the GPU: outputs and q/k/v
    gradients for packed documents and block diffusion. Writes {mask: {"out": .., "grad": ..}}.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.hf import build_reference_model  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.hf_mapping import load_hf_into_model  # noqa: E402
from megadiff.models.llada2.logits import full_logits  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel, run_device  # noqa: E402

S = 32


def logits_errors():
    cfg_dict = preset("tiny")
    reference = build_reference_model(cfg_dict, seed=0)
    state = reference.state_dict()
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (1, S), generator=g)
    half = torch.arange(S // 2)
    allowed = (torch.rand(1, S, S, generator=g) > 0.3) | torch.eye(S, dtype=torch.bool)
    rows = [(torch.arange(S)[None], None), (torch.cat([half, half])[None], allowed)]
    with torch.no_grad():
        wanted = [reference(ids, pos, mask).logits.float() for pos, mask in rows]
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        chunks = build_model(cfg, ParallelLayout(), dtype)
        assert all(p.device == run_device() for c in chunks for p in c.parameters()), "model is not on the GPU"
        load_hf_into_model(chunks, lambda n: state[n], cfg)
        worst = max(
            float((full_logits(chunks, ids, pos, mask) - want).abs().max())
            for (pos, mask), want in zip(rows, wanted, strict=True)
        )
        result[name] = {"max_abs": worst, "ref_max_abs": max(float(w.abs().max()) for w in wanted)}
    return result


def flex_errors():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megadiff.diffusion.block_mask import block_mask_for
    from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
    from megadiff.models.llada2.flex_attention import FlexCoreAttention
    from megadiff.models.llada2.model import mcore_attention_mask

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
        q, k, v = (
            torch.randn(s, b, n, dim, device=device, generator=g).requires_grad_() for n in (heads, groups, groups)
        )
        w = torch.randn(s, b, heads * dim, device=device, generator=g)
        want = dense(q, k, v, mcore_attention_mask(allowed))
        got = flex(q, k, v, block_mask)
        grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
        grads_got = torch.autograd.grad((got * w).sum(), (q, k, v))
        result[name] = {
            "out": float((got - want).abs().max()),
            "grad": max(float((a - e).abs().max()) for a, e in zip(grads_got, grads_want, strict=True)),
            "grad_max_abs": max(float(e.abs().max()) for e in grads_want),
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
