"""torchrun worker: the x_t-only output layer against the full 2S output layer, per layout.

For each layout the tiny LLaDA2 is built twice with the same weights, with xt_only_logits False
(final norm, LM head and logits over all of [x_t ; x_0]) and True (x_t half only), and runs the
trainer's block-diffusion loss (masked CE + CAP confidence term, per-token denominator) through
megatron-core's schedule over two micro-batches. Rank 0 writes, per layout, the relative loss
difference, the worst relative gradient difference over all parameters (max |Δ| / max |ref| per
parameter, MAX over ranks) and the logits length the loss received. S is odd, so under sequence
parallelism (TP=2) the x_t half is padded to a multiple of tp.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch
from megatron.core import parallel_state as ps

from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.hf import build_reference_model
from megadiff.models.common.schedule import forward_backward
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.hf_mapping import load_hf_into_model
from megadiff.models.llada2.model import build_model
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.training.config import DiffusionSection
from megadiff.training.ddp import wrap_ddp
from megadiff.training.loss import diffusion_loss_sums

ROWS, S, BLOCK, MASK_ID = 2, 15, 4, 0


def micro_batches(vocab):
    g = torch.Generator().manual_seed(5)
    out = []
    for row in range(ROWS):
        cut = 6 + 3 * row  # two documents per row
        doc = torch.tensor([[0] * cut + [1] * (S - cut)])
        pos = torch.tensor([list(range(cut)) + list(range(S - cut))])
        x0 = torch.randint(1, vocab, (1, S), generator=g)
        masked = torch.rand(1, S, generator=g) < 0.5
        xt = torch.where(masked, torch.full_like(x0, MASK_ID), x0)
        out.append(
            dict(
                input_ids=torch.cat([xt, x0], 1),
                position_ids=torch.cat([pos, pos], 1),
                allowed=block_diffusion_mask(doc, pos, BLOCK),
                targets=x0,
                masked=masked,
                t=torch.full((1, S), 0.5),
                loss_mask=torch.ones(1, S, dtype=torch.bool),
                doc_ids=doc,
            )
        )
    return out


def loss_and_grads(chunks, batches, diffusion):
    denominator = float(sum(int(b["masked"].sum()) for b in batches))
    lengths = []

    def loss_fn(batch, output):
        lengths.append(output.shape[1])
        sums = diffusion_loss_sums(output, batch, diffusion)
        loss = (sums["numerator"] + diffusion.confidence_beta * sums["cap_numerator"]) / denominator
        return loss, torch.zeros((), dtype=torch.int), {"loss": loss.detach().clone()}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    outputs = forward_backward(chunks, batches, loss_fn)
    loss = torch.tensor(sum(float(o["loss"]) for o in outputs), dtype=torch.double)
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    grads = {name: p.main_grad.detach().clone() for c in chunks for name, p in c.named_parameters()}
    return float(loss), grads, max(lengths, default=0)


def run_layout(layout, cfg, ref_sd):
    initialize_parallel(layout)
    diffusion = DiffusionSection(confidence_beta=2.0)
    batches = micro_batches(cfg.vocab_size)
    results = {}
    for xt_only in (False, True):
        chunks = build_model(cfg, layout, xt_only_logits=xt_only, calculate_per_token_loss=True)
        load_hf_into_model(chunks, lambda name: ref_sd[name], cfg)
        results[xt_only] = loss_and_grads(wrap_ddp(chunks), batches, diffusion)
    (loss_ref, grads_ref, len_ref), (loss_xt, grads_xt, len_xt) = results[False], results[True]
    worst = max(float((grads_xt[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads_ref.items())
    nonzero = sum(int(g.abs().max() > 0) for g in grads_ref.values())
    local = {
        "loss_rel_diff": abs(loss_xt - loss_ref) / abs(loss_ref),
        "grad_rel_err": worst,
        "loss": loss_ref,
        "logits_len_full": float(len_ref),
        "logits_len_xt_only": float(len_xt),
        "params_with_grad": float(nonzero),
    }
    reduced = {}
    for key, value in sorted(local.items()):
        t = torch.tensor(float(value))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        reduced[key] = float(t)
    return reduced


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,pp;...'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = preset("tiny")
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref_sd = build_reference_model(cfg_dict, seed=0).state_dict()
    results = {}
    for item in filter(None, args.layouts.split(";")):
        tp, ep, pp = (int(x) for x in item.split(","))
        layout = ParallelLayout(tp=tp, ep=ep, pp=pp)
        results[str(layout)] = run_layout(layout, cfg, ref_sd)
        if torch.distributed.get_rank() == 0:
            print(layout, results[str(layout)], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
