"""torchrun worker: LoRA on megadiff's LLaDA2 vs the reference model at several layouts in one launch.

Every layout adapts the same modules and loads the same non-zero adapters (B != 0, drawn once from
a fixed seed, via load_full_adapter_state). The oracle is the plain-PyTorch reference holding
MERGED weights: W + (alpha/r) * B @ A on the megatron-core tensor, mapped to HF names by the
converter table. Checks per layout (rank 0 writes the worst values as JSON to --out):
- logits_plain / logits_masked: max |logit diff| (plain input; a random mask with repeated positions);
- full_state_roundtrip: full_adapter_state gives back exactly the adapters that were loaded;
- init_layout_independent: the adapters apply_lora drew equal the (1,1,1) ones (max |diff|);
- grad_rel_err (--grad-layouts): adapter gradients of sum(logits * W) vs the reference's, which
  follow from its weight gradient G (mcore layout): dA = s B^T G, dB = s G A^T;
- base_changed / adapters_unmoved (--step-layouts): after 5 optimizer steps (the trainer's DDP and
  distributed Adam, lr 1e-2) how many frozen tensors differ at all and how many adapter tensors
  did not change (both must be 0); optimizer_bytes_ratio: LoRA optimizer bytes / full fine-tuning's on this rank.
"""

import argparse
import json

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from checkpoint_converters.llada2_mapping import (
    full_mcore_from_hf,
    hf_from_full_mcore,
    hf_names,
    load_hf_into_model,
    rule_for,
)
from megadiff.hf import build_reference_model
from megadiff.lora.apply import apply_lora
from megadiff.lora.state import full_adapter_state, load_full_adapter_state
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.training.config import TrainingConfig
from megadiff.training.ddp import wrap_ddp
from megadiff.training.mcore_configs import ddp_config, optimizer_config
from megadiff.training.optimizer_memory import optimizer_state_bytes
from megadiff.training.schedule import forward_backward

B, S = 2, 16
RANK, ALPHA = 4, 8.0
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def lora_settings(experts: bool) -> dict:
    return dict(rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS, experts=experts, init="kaiming", seed=3)


def parse_layouts(text):
    """'tp,ep,pp[,dense]': 'dense' = routed experts not adapted (the default config)."""
    out = []
    for item in filter(None, text.split(";")):
        parts = item.split(",")
        tp, ep, pp = (int(x) for x in parts[:3])
        out.append((ParallelLayout(tp=tp, ep=ep, pp=pp), "dense" not in parts[3:]))
    return out


def test_adapters(shapes: dict) -> dict:
    """Fixed non-zero adapters for these keys (the same on every rank and layout)."""
    g = torch.Generator().manual_seed(2024)
    return {k: 0.1 * torch.randn(shape, generator=g) for k, shape in sorted(shapes.items())}


def merged_reference(ref_sd: dict, adapters: dict, cfg, cfg_dict) -> torch.nn.Module:
    merged = dict(ref_sd)
    scale = ALPHA / RANK
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rule, index = rule_for(module + ".weight")
        names = hf_names(rule, index)
        w = full_mcore_from_hf(rule, [ref_sd[n] for n in names], cfg)
        w = w + scale * adapters[module + ".lora_B.weight"] @ adapters[key]
        merged.update(zip(names, hf_from_full_mcore(rule, w, cfg), strict=True))
    ref = build_reference_model(cfg_dict, seed=0)
    ref.load_state_dict(merged)
    return ref


def make_inputs(vocab):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    plain = torch.arange(S).expand(B, S).contiguous()
    half = torch.arange(S // 2)
    repeated = torch.cat([half, half]).expand(B, S).contiguous()
    allowed = (torch.rand(B, S, S, generator=g) > 0.3) | torch.eye(S, dtype=torch.bool)
    return ids, [("plain", plain, None), ("masked", repeated, allowed)]


def micro_batches(ids, pos, allowed):
    return [
        dict(
            input_ids=ids[i : i + 1],
            position_ids=pos[i : i + 1],
            row=i,
            allowed=None if allowed is None else allowed[i : i + 1],
        )
        for i in range(B)
    ]


def logits_error(chunks, ref, ids, pos, allowed) -> float:
    with torch.no_grad():
        expected = [
            ref(ids[i : i + 1], pos[i : i + 1], None if allowed is None else allowed[i : i + 1]).logits[0]
            for i in range(B)
        ]

    def loss_fn(batch, output):
        full = gather_from_tensor_model_parallel_region(output)
        diff = (full[0].detach() - expected[batch["row"]]).abs().max()
        return output.sum() * 0.0, torch.tensor(1), {"diff": diff}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = forward_backward(chunks, micro_batches(ids, pos, allowed), loss_fn, forward_only=True)
    return max([float(o["diff"]) for o in out], default=0.0)


def weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights):
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    vocab = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)

    def loss_fn(batch, output):
        return (output * weights[batch["row"] : batch["row"] + 1, :, vocab]).sum(), torch.tensor(1), {}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro_batches(ids, pos, allowed), loss_fn, forward_only=False)


def gradient_error(chunks, ref, adapters, cfg, ids, pos, allowed) -> float:
    weights = torch.randn(B, S, cfg.vocab_size, generator=torch.Generator().manual_seed(11))
    ref.zero_grad()
    ((ref(ids, pos, allowed).logits * weights).sum() / B).backward()
    hf_grads = {n: p.grad for n, p in ref.named_parameters()}
    weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights)
    got = full_adapter_state(chunks, value=lambda p: p.main_grad)
    scale = ALPHA / RANK
    worst = 0.0
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rule, index = rule_for(module + ".weight")
        grads = [
            hf_grads[n] if hf_grads[n] is not None else torch.zeros_like(ref_param(ref, n))
            for n in hf_names(rule, index)
        ]
        g = full_mcore_from_hf(rule, grads, cfg)
        a, b = adapters[key], adapters[module + ".lora_B.weight"]
        for name, want in ((key, scale * b.t() @ g), (module + ".lora_B.weight", scale * g @ a.t())):
            err = float((got[name] - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if err > 1e-5 and torch.distributed.get_rank() == 0:
                print(f"gradient mismatch {name}: rel {err:.3g}", flush=True)
            worst = max(worst, err)
    return worst


def ref_param(ref, name):
    return dict(ref.named_parameters())[name]


def train_steps(chunks, cfg, ids, variant, steps=5) -> dict:
    from megatron.core.optimizer import get_megatron_optimizer

    tcfg = TrainingConfig()
    tcfg.train.lr, tcfg.train.clip_grad = 1e-2, 0.0
    optimizer = get_megatron_optimizer(optimizer_config(tcfg, torch.float32), chunks)
    frozen = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if p.requires_grad}
    _, pos, allowed = variant
    for step in range(steps):
        weights = torch.randn(B, S, cfg.vocab_size, generator=torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights)
        optimizer.step()
    now = {n: p for c in chunks for n, p in c.named_parameters()}
    changed = sum(not torch.equal(now[n], t) for n, t in frozen.items())
    unmoved = sum(torch.equal(now[n], t) for n, t in adapters.items())
    lora_bytes = optimizer_state_bytes(optimizer)
    full_bytes = sum(t.numel() for t in frozen.values()) * (4 + 8) + lora_bytes
    return dict(
        base_changed=changed,
        frozen_tensors=len(frozen),
        adapter_tensors=len(adapters),
        adapters_unmoved=unmoved,
        optimizer_bytes_ratio=lora_bytes / full_bytes,
    )


def lora_model(layout, experts, ref_sd, cfg, adapters=None, ddp=None):
    """Model chunks with the base weights, adapted, holding `adapters` (if given), in DDP `ddp`."""
    initialize_parallel(layout)
    chunks = build_model(cfg, layout, calculate_per_token_loss=True)
    load_hf_into_model(chunks, lambda name: ref_sd[name], cfg)
    apply_lora(chunks, **lora_settings(experts))
    if adapters is not None:
        load_full_adapter_state(chunks, adapters)
    return chunks if ddp is None else wrap_ddp(chunks, ddp_config=ddp)


def run_layout(layout, experts, ref_sd, refs, cfg, cfg_dict, check_grads, check_steps, first_init):
    chunks = lora_model(layout, experts, ref_sd, cfg)
    result = {}
    initial = full_adapter_state(chunks)
    if experts in first_init:
        want = first_init[experts]
        assert initial.keys() == want.keys()
        result["init_layout_independent"] = max(float((initial[k] - want[k]).abs().max()) for k in want)
    else:
        first_init[experts] = initial
    adapters = test_adapters({k: v.shape for k, v in initial.items()})
    load_full_adapter_state(chunks, adapters)
    back = full_adapter_state(chunks)
    result["full_state_roundtrip"] = max(float((back[k] - adapters[k]).abs().max()) for k in adapters)
    if experts not in refs:
        refs[experts] = merged_reference(ref_sd, adapters, cfg, cfg_dict)
    ref = refs[experts]
    chunks = wrap_ddp(chunks)  # plain DDP: every rank's main_grad is the whole reduced gradient
    ids, variants = make_inputs(cfg.vocab_size)
    for name, pos, allowed in variants:
        result[f"logits_{name}"] = logits_error(chunks, ref, ids, pos, allowed)
    if check_grads:
        result["grad_rel_err"] = gradient_error(chunks, ref, adapters, cfg, ids, *variants[1][1:])
    if check_steps:  # the trainer's DDP (distributed optimizer) around a fresh model
        chunks = lora_model(layout, experts, ref_sd, cfg, adapters, ddp=ddp_config(TrainingConfig()))
        result.update(train_steps(chunks, cfg, ids, variants[1]))
    result["routed_expert_adapters"] = sum(".local_experts." in k for k in adapters) // 2
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,pp[,dense];...'")
    parser.add_argument("--grad-layouts", default="")
    parser.add_argument("--step-layouts", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = preset("tiny")
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref_sd = build_reference_model(cfg_dict, seed=0).state_dict()
    grads, steps = set(parse_layouts(args.grad_layouts)), set(parse_layouts(args.step_layouts))
    refs, first_init, results = {}, {}, {}
    for layout, experts in parse_layouts(args.layouts):
        local = run_layout(
            layout,
            experts,
            ref_sd,
            refs,
            cfg,
            cfg_dict,
            (layout, experts) in grads,
            (layout, experts) in steps,
            first_init,
        )
        reduced = {}
        for key, value in sorted(local.items()):
            t = torch.tensor(float(value))
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            reduced[key] = float(t)
        name = f"{layout}" + ("" if experts else ",dense")
        results[name] = reduced
        if torch.distributed.get_rank() == 0:
            print(name, reduced, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
