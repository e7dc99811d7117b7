"""torchrun worker: megadiff LLaDA2 vs the reference model at several layouts in one launch.

For each layout: logits (plain input, and a blocked-pairs mask with repeated positions
[0..L/2-1, 0..L/2-1]), optionally gradients of a scalar loss mapped back to HF names, and the
routing of every MoE layer. Rank 0 writes the worst errors per layout as JSON to --out.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megadiff.hf import build_reference_model  # noqa: E402
from megadiff.models.common.grouped_experts import TorchGroupedMLP  # noqa: E402
from megadiff.models.common.schedule import forward_backward  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.hf_mapping import gather_hf_state, load_hf_into_model  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402

B, S = 2, 16


def parse_layouts(text):
    """'tp,ep,pp[,vpp][/experts];...' -> [(ParallelLayout, moe_experts)]; experts default: auto."""
    layouts = []
    for item in filter(None, text.split(";")):
        sizes, _, experts = item.partition("/")
        tp, ep, pp, *vpp = (int(x) for x in sizes.split(","))
        layouts.append((ParallelLayout(tp=tp, ep=ep, pp=pp, vpp=vpp[0] if vpp else None), experts or "auto"))
    return layouts


def make_inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    plain_pos = torch.arange(S).expand(B, S).contiguous()
    half = torch.arange(S // 2)
    repeated_pos = torch.cat([half, half]).expand(B, S).contiguous()
    allowed = torch.rand(B, S, S, generator=g) > 0.3
    allowed |= torch.eye(S, dtype=torch.bool)  # every query sees at least itself
    return ids, [("plain", plain_pos, None), ("masked_repeated_positions", repeated_pos, allowed)]


def reference_outputs(ref, ids, pos, allowed):
    """Per-row reference logits and routing (mcore micro-batches are single rows)."""
    rows = []
    for i in range(B):
        mask = None if allowed is None else allowed[i : i + 1]
        logits = ref(ids[i : i + 1], pos[i : i + 1], mask).logits[0]
        routing = {}
        for layer, block in ref.moe_blocks():
            idx, w = block.last_routing
            dense = torch.zeros(idx.shape[0], block.gate.num_experts).scatter_(1, idx, w)
            routing[layer] = dense
        rows.append((logits.detach(), routing))
    return rows


def attach_router_hooks(chunks, store):
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        for layer in module.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is None:
                continue
            number = layer.layer_number - 1

            def hook(mod, inputs, outputs, number=number):
                probs, routing_map = outputs
                store.setdefault(number, []).append((probs.detach().float(), routing_map.detach()))

            router.register_forward_hook(hook)


def run_layout(layout, experts, ref_sd, ref, cfg, cfg_dict, check_grads):
    initialize_parallel(layout)
    chunks = build_model(cfg, layout, moe_experts=experts, calculate_per_token_loss=True)
    moe = [layer.mlp.experts for c in chunks for layer in c.decoder.layers if hasattr(layer.mlp, "experts")]
    load_hf_into_model(chunks, lambda name: ref_sd[name], cfg)
    if check_grads:
        chunks = wrap_ddp(chunks)
    ids, variants = make_inputs(cfg.vocab_size)
    tp_rank = ps.get_tensor_model_parallel_rank()
    result = {"grouped_experts": float(all(isinstance(m, TorchGroupedMLP) for m in moe))}
    for name, pos, allowed in variants:
        routes = {}
        if name == "plain":
            attach_router_hooks(chunks, routes)
        expected = reference_outputs(ref, ids, pos, allowed)
        micro = [
            dict(
                input_ids=ids[i : i + 1],
                position_ids=pos[i : i + 1],
                row=i,
                allowed=None if allowed is None else allowed[i : i + 1],
            )
            for i in range(B)
        ]

        def loss_fn(batch, output, expected=expected):  # bound now: called within this iteration
            full = gather_from_tensor_model_parallel_region(output)
            diff = (full[0].detach() - expected[batch["row"]][0]).abs().max()
            return output.sum() * 0.0, torch.tensor(1), {"logit_diff": diff}

        for c in chunks:
            c.eval()
        with torch.no_grad():
            out = forward_backward(chunks, micro, loss_fn, forward_only=True)
        diff = max([float(o["logit_diff"]) for o in out], default=0.0)
        result[f"logits_{name}"] = diff
        if name == "plain":
            result["routing_mismatch"] = routing_mismatch(routes, expected, layout, tp_rank)
    if check_grads:
        result["grad_rel_err"] = gradient_error(chunks, ref, cfg, ids, variants[1])
    return result


def routing_mismatch(routes, expected, layout, tp_rank):
    """Largest |weight difference| between megatron-core and reference routing (0 = identical,
    1+ = a different expert chosen)."""
    worst = 0.0
    for layer, calls in routes.items():
        for row, (probs, routing_map) in enumerate(calls[:B]):
            ref_dense = expected[row][1][layer]
            per_rank = ref_dense.shape[0] // layout.tp if layout.tp > 1 else ref_dense.shape[0]
            ref_dense = ref_dense[tp_rank * per_rank : (tp_rank + 1) * per_rank]
            ref_map = ref_dense > 0
            if not torch.equal(ref_map, routing_map.bool()):
                worst = max(worst, 1.0 + float((ref_map != routing_map.bool()).sum()))
            worst = max(worst, float((probs - ref_dense).abs().max()))
    return worst


def gradient_error(chunks, ref, cfg, ids, variant):
    """Scalar loss sum(logits * W) over both rows; compare d loss / d param under HF names."""
    _, pos, allowed = variant
    g = torch.Generator().manual_seed(11)
    weights = torch.randn(B, S, cfg.vocab_size, generator=g)
    ref.zero_grad()
    ref_loss = (ref(ids, pos, allowed).logits * weights).sum() / B
    ref_loss.backward()
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    vocab_slice = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)
    micro = [
        dict(input_ids=ids[i : i + 1], position_ids=pos[i : i + 1], allowed=allowed[i : i + 1], row=i) for i in range(B)
    ]

    def loss_fn(batch, output):
        w = weights[batch["row"] : batch["row"] + 1, :, vocab_slice]
        return (output * w).sum(), torch.tensor(1), {}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro, loss_fn, forward_only=False)
    grads = gather_hf_state(
        chunks, cfg, value=lambda p: p.main_grad if hasattr(p, "main_grad") else torch.zeros_like(p)
    )
    worst = 0.0
    for name, p in ref.named_parameters():
        got = grads[name]
        want = p.grad.float() if p.grad is not None else torch.zeros_like(p)  # expert never routed
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if err > 1e-5 and torch.distributed.get_rank() == 0:
            print(f"gradient mismatch {name}: rel {err:.3g}", flush=True)
        worst = max(worst, err)
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,pp[,vpp];...'")
    parser.add_argument("--grad-layouts", default="", help="layouts that also check gradients")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = preset("tiny")
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref = build_reference_model(cfg_dict, seed=0)
    ref_sd = ref.state_dict()
    grad_layouts = set(parse_layouts(args.grad_layouts))
    results = {}
    for layout, experts in parse_layouts(args.layouts):
        local = run_layout(layout, experts, ref_sd, ref, cfg, cfg_dict, (layout, experts) in grad_layouts)
        reduced = {}
        for key, value in sorted(local.items()):
            t = torch.tensor(float(value))
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            reduced[key] = float(t)
        key = str(layout) + ("" if experts == "auto" else f"/{experts}")
        results[key] = reduced
        if torch.distributed.get_rank() == 0:
            print(key, reduced, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
