"""torchrun worker: grouped experts (torch._grouped_mm) against megatron-core's SequentialMLP, several
expert layouts in one launch.

The model is the tiny LLaDA2 with plain top-2 routing (no expert groups), and experts 2, 6 and 7
get an expert bias of -100, so they are never chosen: at EP=4 the rank holding experts 6 and 7
receives no token at all, and other ranks hold experts without tokens. For each layout both
expert implementations are built from the same weights, run forward and backward on the same
micro-batches, and compared: logits, every gradient under its HF name (gathered from all shards),
and the sharded state dict's layout (keys, global shapes, offsets, replica ids), which
checkpoints and converters rely on. At the first layout, LoRA on grouped routed experts is refused
when adapters are added and, should a wrapped expert linear reach it anyway, at the forward.
Rank 0 writes the results as JSON to --out.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megadiff.errors import ConfigError  # noqa: E402
from megadiff.hf import build_reference_model  # noqa: E402
from megadiff.lora.adapters import LoRAColumnParallel, lora_class  # noqa: E402
from megadiff.lora.apply import LoRAConfigError, apply_lora  # noqa: E402
from megadiff.models.common.gpt import forward_chunk  # noqa: E402
from megadiff.models.common.schedule import forward_backward  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.hf_mapping import gather_hf_state, load_hf_into_model  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402

B, S = 2, 16
UNUSED_EXPERTS = (2, 6, 7)


def parse_layouts(text):
    """'tp,ep,etp;...' -> ParallelLayouts."""
    layouts = []
    for item in filter(None, text.split(";")):
        tp, ep, etp = (int(x) for x in item.split(","))
        layouts.append(ParallelLayout(tp=tp, ep=ep, etp=etp))
    return layouts


def run(experts, layout, cfg, ref_sd, ids, pos, weights):
    """Logits [B, S, V], HF-named gradients, tokens per local expert (one list per MoE layer call)
    and the sharded state dict's layout, for one expert implementation."""
    chunks = build_model(cfg, layout, moe_experts=experts, calculate_per_token_loss=True)
    (model,) = chunks
    layout_of_checkpoint = {
        key: (t.key, tuple(t.global_shape), tuple(t.global_offset), tuple(t.replica_id))
        for key, t in model.sharded_state_dict().items()
        if hasattr(t, "global_shape")
    }
    load_hf_into_model(chunks, lambda name: ref_sd[name], cfg)
    counts = []
    for layer in model.decoder.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.register_forward_pre_hook(lambda m, args: counts.append(args[1].tolist()))
    chunks = wrap_ddp(chunks)
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    vocab = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)
    logits = [None] * B

    def loss_fn(batch, output):
        row = batch["row"]
        logits[row] = gather_from_tensor_model_parallel_region(output)[0].detach()
        return (output * weights[row : row + 1, :, vocab]).sum(), torch.tensor(1), {}

    micro = [dict(input_ids=ids[i : i + 1], position_ids=pos[i : i + 1], row=i) for i in range(B)]
    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro, loss_fn)
    grads = gather_hf_state(chunks, cfg, value=lambda p: getattr(p, "main_grad", torch.zeros_like(p)))
    return torch.stack(logits), grads, counts, layout_of_checkpoint


def compare(layout, cfg, ref_sd):
    initialize_parallel(layout)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S).contiguous()
    weights = torch.randn(B, S, cfg.vocab_size, generator=g)
    seq_logits, seq_grads, seq_counts, seq_ckpt = run("sequential", layout, cfg, ref_sd, ids, pos, weights)
    grp_logits, grp_grads, grp_counts, grp_ckpt = run("grouped", layout, cfg, ref_sd, ids, pos, weights)
    grad_rel, worst = 0.0, None
    for name, want in seq_grads.items():
        err = float((grp_grads[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if err > grad_rel:
            grad_rel, worst = err, name
    unused = [n for n in seq_grads if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) in UNUSED_EXPERTS]
    flat = [c for layer in seq_counts for c in layer]
    return {
        "logits_rel": float((grp_logits - seq_logits).abs().max() / seq_logits.abs().max()),
        "grad_rel": grad_rel,
        "worst_grad": worst,
        "grads_compared": len(seq_grads),
        "same_grad_names": sorted(seq_grads) == sorted(grp_grads),
        # experts that got no token: exactly zero gradient in both (grouped masks its kernel's output)
        "unused_expert_grads_max": max(float(grp_grads[n].abs().max()) for n in unused) if unused else -1.0,
        "unused_expert_grads": len(unused),
        "same_counts": seq_counts == grp_counts,
        "experts_without_tokens": sum(c == 0 for c in flat),
        "rank_without_tokens": float(any(sum(layer) == 0 for layer in seq_counts)),
        "same_checkpoint_layout": seq_ckpt == grp_ckpt,
        "checkpoint_tensors": len(seq_ckpt),
    }


def lora_refusals(cfg, layout) -> dict:
    """1.0 for each place LoRA on grouped experts is refused with a message naming the keys."""
    initialize_parallel(layout)
    (model,) = build_model(cfg, layout, moe_experts="grouped")
    found = {}
    try:
        apply_lora([model], 4, 8.0, 0.0, ["linear_fc1"], True, "kaiming", 0)
    except LoRAConfigError as e:
        found["apply_lora"] = float("lora.experts=true" in str(e) and "perf.moe_experts=sequential" in str(e))
    fc1 = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1
    fc1.__class__ = lora_class(type(fc1), LoRAColumnParallel)  # as apply_lora would wrap it
    try:
        forward_chunk(model, torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None])
    except ConfigError as e:
        found["forward"] = float("perf.moe_experts=sequential with lora.experts=true" in str(e))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,etp;...'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=2)
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref_sd = build_reference_model(cfg_dict, seed=0).state_dict()
    for name, bias in ref_sd.items():
        if name.endswith("mlp.gate.expert_bias"):
            bias[list(UNUSED_EXPERTS)] = -100.0
    results = {"lora_refused": lora_refusals(cfg, parse_layouts(args.layouts)[0])}
    for layout in parse_layouts(args.layouts):
        local = compare(layout, cfg, ref_sd)
        merged = {}
        for key, value in local.items():  # worst over ranks; sums of the counts
            if isinstance(value, (bool, int, float)):
                t = torch.tensor(float(value))
                op = (
                    torch.distributed.ReduceOp.SUM
                    if key == "experts_without_tokens"
                    else torch.distributed.ReduceOp.MAX
                )
                if isinstance(value, bool):
                    op, t = torch.distributed.ReduceOp.MIN, torch.tensor(float(value))
                torch.distributed.all_reduce(t, op=op)
                merged[key] = float(t)
            else:
                merged[key] = value
        results[str(layout)] = merged
        if torch.distributed.get_rank() == 0:
            print(layout, merged, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
