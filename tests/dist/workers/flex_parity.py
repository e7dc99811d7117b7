"""torchrun worker: FlexCoreAttention (BlockMask) against the dense paths, per layout.

Checks (each layout; rank 0 writes the worst errors as JSON to --out):
- attention (--attention): FlexCoreAttention vs megatron-core DotProductAttention with the
  equivalent dense bool mask, random q/k/v with GQA, outputs and q/k/v gradients, for masks
  none / packed docs / block diffusion, lengths spanning several 128-row tiles.
- model: LLaDA2 (tiny) built with attention_backend="flex" and fed BlockMasks from
  block_mask_for: logits vs the reference model with the dense mask (block diffusion over
  [x_t ; x_0] with positions repeated, and, with --full-mode, full attention over packed docs);
  gradients of a scalar loss vs the same model built with attention_backend="dense"; and a
  control: the flex model given the wrong mask must NOT match (the comparison can fail).
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megadiff.diffusion.block_mask import block_mask_for  # noqa: E402
from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask  # noqa: E402
from megadiff.hf import build_reference_model  # noqa: E402
from megadiff.models.common.attention import FlexCoreAttention  # noqa: E402
from megadiff.models.common.gpt import mcore_attention_mask  # noqa: E402
from megadiff.models.common.schedule import forward_backward  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.hf_mapping import load_hf_into_model  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.platform.cpu_flex_attention import cpu_flex_is_compiled  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402

B, L, BLOCK = 2, 16, 4  # rows, tokens per half, diffusion block size


def packed_rows(length, single_doc_first_row=False):
    """doc_ids / position_ids [B, length]: row 0 holds two documents (or one), row 1 three."""
    cuts = [[] if single_doc_first_row else [length * 3 // 8], [length // 4, length * 5 // 8]]
    doc = torch.zeros(B, length, dtype=torch.long)
    pos = torch.zeros(B, length, dtype=torch.long)
    for row, row_cuts in enumerate(cuts):
        starts = [0, *row_cuts]
        for d, (a, b) in enumerate(zip(starts, [*row_cuts, length], strict=True)):
            doc[row, a:b] = d
            pos[row, a:b] = torch.arange(b - a)
    return doc, pos


# ---------------------------------------------------------------- (a) core attention


def attention_errors(layout):
    g = torch.Generator().manual_seed(3)
    heads, groups, dim = 4, 2, 16  # the tiny preset's geometry (compiled kernels are shared)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=dim,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
    )
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self")
    dense_attn, flex_attn = DotProductAttention(**args), FlexCoreAttention(**args)
    np_, ng = heads // layout.tp, groups // layout.tp
    # Lengths span several 128-row tiles; row 0 is one document, so the BlockMasks hold full
    # tiles (no mask_mod needed) as well as partial ones.
    cases = {}
    doc, pos = packed_rows(300, single_doc_first_row=True)
    cases["none"] = (None, None, 300)
    cases["packed_docs"] = (full_attention_mask(doc), block_mask_for(doc, pos, "full"), 300)
    doc, pos = packed_rows(320, single_doc_first_row=True)
    cases["block_diffusion"] = (block_diffusion_mask(doc, pos, BLOCK), block_mask_for(doc, pos, "bd", BLOCK), 640)
    out = {}
    for name, (allowed, block_mask, s) in cases.items():
        q = torch.randn(s, B, np_, dim, generator=g).requires_grad_()
        k = torch.randn(s, B, ng, dim, generator=g).requires_grad_()
        v = torch.randn(s, B, ng, dim, generator=g).requires_grad_()
        w = torch.randn(s, B, np_ * dim, generator=g)
        want = dense_attn(q, k, v, mcore_attention_mask(allowed))
        got = flex_attn(q, k, v, block_mask)
        grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
        grads_got = torch.autograd.grad((got * w).sum(), (q, k, v))
        out[f"attn_{name}_out"] = float((got - want).detach().abs().max())
        out[f"attn_{name}_grad"] = max(float((a - b).abs().max()) for a, b in zip(grads_got, grads_want, strict=True))
        if block_mask is not None:
            out[f"attn_{name}_tiles_full_partial"] = float(
                min(block_mask.full_kv_num_blocks.sum(), block_mask.kv_num_blocks.sum())
            )
    try:
        flex_attn(q, k, v, mcore_attention_mask(full_attention_mask(doc)))
        out["attn_rejects_dense_mask"] = 0.0
    except TypeError:
        out["attn_rejects_dense_mask"] = 1.0
    return out


# ---------------------------------------------------------------- (b)/(c) whole model


def model_inputs(cfg):
    g = torch.Generator().manual_seed(7)
    doc, pos = packed_rows(L)
    x0 = torch.randint(1, cfg.vocab_size, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, torch.zeros_like(x0), x0)  # 0 = "mask"
    return doc, pos, x0, xt


def variants(cfg, full_mode):
    """(name, ids, position ids, dense allowed mask, per-row BlockMasks, wrong per-row BlockMasks)."""
    doc, pos, x0, xt = model_inputs(cfg)
    rows = range(B)
    bd_masks = [block_mask_for(doc[i : i + 1], pos[i : i + 1], "bd", BLOCK) for i in rows]
    # control: plain doc-level attention over [x_t ; x_0] (x_t then sees x_0 of its own block)
    doc2 = torch.cat([doc, doc], 1)
    wrong = [block_mask_for(doc2[i : i + 1], doc2[i : i + 1], "full") for i in rows]
    out = [
        ("bd", torch.cat([xt, x0], 1), torch.cat([pos, pos], 1), block_diffusion_mask(doc, pos, BLOCK), bd_masks, wrong)
    ]
    if full_mode:
        full_masks = [block_mask_for(doc[i : i + 1], pos[i : i + 1], "full") for i in rows]
        out.append(("full", xt, pos, full_attention_mask(doc), full_masks, None))
    return out


def run_forward(chunks, ids, pos, masks):
    """Full-vocab logits [B, s, V] for every row (each row one micro-batch)."""
    micro = [dict(input_ids=ids[i : i + 1], position_ids=pos[i : i + 1], allowed=masks[i], row=i) for i in range(B)]
    logits = [None] * B

    def loss_fn(batch, output):
        logits[batch["row"]] = gather_from_tensor_model_parallel_region(output)[0].detach()
        return output.sum() * 0.0, torch.tensor(1), {}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        forward_backward(chunks, micro, loss_fn, forward_only=True)
    return torch.stack(logits)


def run_grads(chunks, ids, pos, masks, weights, vocab_slice):
    micro = [dict(input_ids=ids[i : i + 1], position_ids=pos[i : i + 1], allowed=masks[i], row=i) for i in range(B)]

    def loss_fn(batch, output):
        w = weights[batch["row"] : batch["row"] + 1, :, vocab_slice]
        return (output * w).sum(), torch.tensor(1), {}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro, loss_fn, forward_only=False)
    return {name: p.main_grad.detach().clone() for c in chunks for name, p in c.named_parameters()}


def model_errors(layout, ref, ref_sd, cfg, full_mode):
    built = {}
    for backend in ("flex", "dense"):
        chunks = build_model(cfg, layout, attention_backend=backend, calculate_per_token_loss=True)
        load_hf_into_model(chunks, lambda name: ref_sd[name], cfg)
        built[backend] = wrap_ddp(chunks)
    flex, dense = built["flex"], built["dense"]
    out = {
        "flex_core_attention_layers": float(sum(isinstance(m, FlexCoreAttention) for c in flex for m in c.modules()))
    }
    for name, ids, pos, allowed, block_masks, wrong in variants(cfg, full_mode):
        with torch.no_grad():
            want = ref(ids, pos, allowed).logits
        out[f"logits_{name}"] = float((run_forward(flex, ids, pos, block_masks) - want).abs().max())
        if wrong is not None:
            out[f"logits_{name}_wrong_mask"] = float((run_forward(flex, ids, pos, wrong) - want).abs().max())
        if name == "bd":
            tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
            vocab_slice = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)
            weights = torch.randn(B, ids.shape[1], cfg.vocab_size, generator=torch.Generator().manual_seed(11))
            dense_masks = [allowed[i : i + 1] for i in range(B)]
            got = run_grads(flex, ids, pos, block_masks, weights, vocab_slice)
            want_grads = run_grads(dense, ids, pos, dense_masks, weights, vocab_slice)
            worst, scale = 0.0, 0.0
            for pname, w in want_grads.items():
                worst = max(worst, float((got[pname] - w).abs().max() / w.abs().max().clamp_min(1e-12)))
                scale = max(scale, float(w.abs().max()))
            out["grad_rel_err_vs_dense"] = worst
            out["grad_max_abs"] = scale
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,pp;...'")
    parser.add_argument("--attention", action="store_true", help="also run the core-attention check")
    parser.add_argument("--full-mode", action="store_true", help="also check full attention (packed docs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = preset("tiny")
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref = build_reference_model(cfg_dict, seed=0)
    ref_sd = ref.state_dict()
    results = {}
    for item in filter(None, args.layouts.split(";")):
        tp, ep, pp = (int(x) for x in item.split(","))
        layout = ParallelLayout(tp=tp, ep=ep, pp=pp)
        initialize_parallel(layout)
        local = attention_errors(layout) if args.attention else {}
        local.update(model_errors(layout, ref, ref_sd, cfg, args.full_mode))
        local["cpu_flex_compiled"] = float(cpu_flex_is_compiled())
        reduced = {}
        for key, value in sorted(local.items()):
            t = torch.tensor(float(value))
            op = (
                torch.distributed.ReduceOp.MIN
                if "wrong_mask" in key or "rejects" in key or "compiled" in key or "layers" in key or "tiles" in key
                else torch.distributed.ReduceOp.MAX
            )
            torch.distributed.all_reduce(t, op=op)
            reduced[key] = float(t)
        results[str(layout)] = reduced
        if torch.distributed.get_rank() == 0:
            print(layout, reduced, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
