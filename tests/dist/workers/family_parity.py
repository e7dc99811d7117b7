"""torchrun worker: a model family on megatron-core vs its own plain-PyTorch reference, many layouts
in one launch.

Jobs: `--job FAMILY[:VARIANT]@tp,ep,pp[,vpp];...` (VARIANT: `nobias` = LLaDA-MoE without expert
bias, i.e. megatron-core's own router). For each layout: logits on a plain row and on a masked row
with repeated positions [0..S/2-1, 0..S/2-1]; MoE routing (experts and weights) per layer; with
`--grad-layouts`, the gradients of a scalar loss mapped back to HF names; with
`--roundtrip-layouts`, HF -> megatron -> HF through the mapping objects (load, then gather) must
return every tensor bit for bit. Rank 0 writes {job@layout: {check: worst error}} to --out.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megadiff.models.common.gpt import build_gpt_chunks  # noqa: E402
from megadiff.models.common.hf_weights import gather_hf_state, load_hf_into_model  # noqa: E402
from megadiff.models.common.schedule import forward_backward  # noqa: E402
from megadiff.models.registry import family  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.platform.parallel_layout import ParallelLayout  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402

B, S = 2, 16
VARIANTS = {"nobias": dict(moe_router_enable_expert_bias=False)}


def parse_layouts(text):
    out = []
    for item in filter(None, text.split(";")):
        tp, ep, pp, *vpp = (int(x) for x in item.split(","))
        out.append(ParallelLayout(tp=tp, ep=ep, pp=pp, vpp=vpp[0] if vpp else None))
    return out


def make_inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    half = torch.arange(S // 2)
    allowed = (torch.rand(B, S, S, generator=g) > 0.3) | torch.eye(S, dtype=torch.bool)
    return ids, [
        ("plain", torch.arange(S).expand(B, S).contiguous(), None),
        ("masked_repeated_positions", torch.cat([half, half]).expand(B, S).contiguous(), allowed),
    ]


def reference_rows(ref, ids, pos, allowed):
    """Per-row reference logits and dense routing [tokens, experts] per MoE layer."""
    rows = []
    for i in range(B):
        mask = None if allowed is None else allowed[i : i + 1]
        logits = ref(ids[i : i + 1], pos[i : i + 1], mask).logits[0].detach()
        routing = {}
        for layer, block in getattr(ref, "moe_blocks", list)():
            chosen, weights = block.last_routing
            routing[layer] = torch.zeros(chosen.shape[0], block.gate.weight.shape[0]).scatter_(1, chosen, weights)
        rows.append((logits, routing))
    return rows


def attach_router_hooks(chunks, store):
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        for layer in module.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:

                def hook(mod, inputs, outputs, number=layer.layer_number - 1):
                    probs, routing_map = outputs
                    store.setdefault(number, []).append((probs.detach().float(), routing_map.detach()))

                router.register_forward_hook(hook)


def routing_mismatch(routes, expected, tp, tp_rank):
    """Largest |weight difference| (0 = identical; >= 1 = a different expert chosen)."""
    worst = 0.0
    for layer, calls in routes.items():
        for row, (probs, routing_map) in enumerate(calls[:B]):
            ref = expected[row][1][layer]
            per_rank = ref.shape[0] // tp
            ref = ref[tp_rank * per_rank : (tp_rank + 1) * per_rank]
            if not torch.equal(ref > 0, routing_map.bool()):
                worst = max(worst, 1.0 + float(((ref > 0) != routing_map.bool()).sum()))
            worst = max(worst, float((probs - ref).abs().max()))
    return worst


def gradient_error(chunks, ref, fam, cfg, ids, variant):
    """d(sum(logits * W)) / d(param) under HF names against the reference's autograd."""
    _, pos, allowed = variant
    weights = torch.randn(B, S, cfg.vocab_size, generator=torch.Generator().manual_seed(11))
    ref.zero_grad()
    ((ref(ids, pos, allowed).logits * weights).sum() / B).backward()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    vocab = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)
    micro = [
        dict(input_ids=ids[i : i + 1], position_ids=pos[i : i + 1], allowed=allowed[i : i + 1], row=i) for i in range(B)
    ]

    def loss_fn(batch, output):
        return (output * weights[batch["row"] : batch["row"] + 1, :, vocab]).sum(), torch.tensor(1), {}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro, loss_fn, forward_only=False)
    grads = gather_hf_state(chunks, fam.mapping, cfg, value=lambda p: getattr(p, "main_grad", torch.zeros_like(p)))
    worst = 0.0
    for name, p in ref.named_parameters():
        want = p.grad.float() if p.grad is not None else torch.zeros_like(p)  # an expert never routed
        err = float((grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if err > 1e-5 and torch.distributed.get_rank() == 0:
            print(f"gradient mismatch {name}: rel {err:.3g}", flush=True)
        worst = max(worst, err)
    return worst


def run_layout(fam, cfg, ref, layout, grads: bool, roundtrip: bool):
    initialize_parallel(layout)
    chunks = build_gpt_chunks(fam, cfg, layout, calculate_per_token_loss=True)
    experts = {type(m).__name__ for c in chunks for n, m in c.named_modules() if n.endswith("mlp.experts")}
    assert experts <= {"TorchGroupedMLP"}, experts  # moe_experts=auto on the CPU (dense LLaDA has none)
    hf_state = {k: v for k, v in ref.state_dict().items()}
    load_hf_into_model(chunks, lambda name: hf_state[name], fam.mapping, cfg)
    result = {}
    if roundtrip:
        back = gather_hf_state(chunks, fam.mapping, cfg)
        exact = set(back) == set(hf_state) and all(torch.equal(back[k], hf_state[k].float()) for k in hf_state)
        result["roundtrip_not_exact"] = 0.0 if exact else 1.0
    if grads:
        chunks = wrap_ddp(chunks)
    ids, variants = make_inputs(cfg.vocab_size)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for name, pos, allowed in variants:
        routes = {}
        if name == "plain":
            attach_router_hooks(chunks, routes)
        expected = reference_rows(ref, ids, pos, allowed)
        micro = [
            dict(
                input_ids=ids[i : i + 1],
                position_ids=pos[i : i + 1],
                allowed=None if allowed is None else allowed[i : i + 1],
                row=i,
            )
            for i in range(B)
        ]

        def loss_fn(batch, output, expected=expected):
            full = gather_from_tensor_model_parallel_region(output)
            diff = (full[0].detach() - expected[batch["row"]][0]).abs().max()
            return output.sum() * 0.0, torch.tensor(1), {"logit_diff": diff}

        for c in chunks:
            c.eval()
        with torch.no_grad():
            out = forward_backward(chunks, micro, loss_fn, forward_only=True)
        result[f"logits_{name}"] = max([float(o["logit_diff"]) for o in out], default=0.0)
        if name == "plain" and cfg.num_experts:
            result["routing_mismatch"] = routing_mismatch(routes, expected, tp, tp_rank)
    if grads:
        result["grad_rel_err"] = gradient_error(chunks, ref, fam, cfg, ids, variants[1])
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", action="append", required=True, help="FAMILY[:VARIANT]@tp,ep,pp[,vpp];...")
    parser.add_argument("--grad-layouts", default="", help="layouts that also check gradients")
    parser.add_argument("--roundtrip-layouts", default="", help="layouts that also check HF->mcore->HF")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    grad_layouts, roundtrip_layouts = set(parse_layouts(args.grad_layouts)), set(parse_layouts(args.roundtrip_layouts))
    results = {}
    for job in args.job:
        name, layouts = job.split("@")
        family_name, _, variant = name.partition(":")
        fam = family(family_name)
        cfg_dict = fam.preset("tiny", **VARIANTS.get(variant, {}))
        cfg = fam.config_from_hf(cfg_dict)
        ref = fam.build_reference(cfg_dict, seed=0)
        for layout in parse_layouts(layouts):
            local = run_layout(fam, cfg, ref, layout, layout in grad_layouts, layout in roundtrip_layouts)
            reduced = {}
            for key, value in sorted(local.items()):
                t = torch.tensor(float(value))
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                reduced[key] = float(t)
            results[f"{name}@{layout}"] = reduced
            if torch.distributed.get_rank() == 0:
                print(name, layout, reduced, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
