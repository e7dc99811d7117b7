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
import math

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
from megadiff.diffusion.loss import masked_diffusion_loss
from megadiff.hf import build_reference_model, load_reference_model
from megadiff.lora.apply import apply_lora
from megadiff.lora.state import full_adapter_state, load_full_adapter_state
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.training.batch import prepare_micro_batch
from megadiff.training.config import TrainingConfig, load_config
from megadiff.training.ddp import wrap_ddp
from megadiff.training.loop import Trainer
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


def merge_adapters(ref: torch.nn.Module, adapters: dict, cfg) -> torch.nn.Module:
    """`ref` with W + (alpha/r) * B @ A in place of every adapted weight (mcore layout, then the table)."""
    sd = ref.state_dict()
    merged = {}
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rule, index = rule_for(module + ".weight")
        names = hf_names(rule, index)
        w = full_mcore_from_hf(rule, [sd[n] for n in names], cfg)
        w = w + (ALPHA / RANK) * adapters[module + ".lora_B.weight"] @ adapters[key]
        merged.update(zip(names, hf_from_full_mcore(rule, w, cfg), strict=True))
    ref.load_state_dict(sd | merged)
    return ref


def hf_grads_of(ref) -> dict:
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in ref.named_parameters()}


def adapter_grad_error(got: dict, adapters: dict, hf_grads: dict, cfg) -> float:
    """Max rel. error of adapter gradients `got` vs those implied by the merged reference's weight
    gradients `hf_grads`: with G the weight gradient in megatron layout, dA = s B^T G, dB = s G A^T."""
    worst = 0.0
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        rule, index = rule_for(module + ".weight")
        g = full_mcore_from_hf(rule, [hf_grads[n] for n in hf_names(rule, index)], cfg)
        a, b = adapters[key], adapters[module + ".lora_B.weight"]
        scale = ALPHA / RANK
        for name, want in ((key, scale * b.t() @ g), (module + ".lora_B.weight", scale * g @ a.t())):
            err = float((got[name].cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12))
            if err > 1e-5 and torch.distributed.get_rank() == 0:
                print(f"gradient mismatch {name}: rel {err:.3g}", flush=True)
            worst = max(worst, err)
    return worst


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
    weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights)
    return adapter_grad_error(full_adapter_state(chunks, value=lambda p: p.main_grad), adapters, hf_grads_of(ref), cfg)


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


def adapter_sharded_state(chunks) -> dict:
    """The adapter entries of the model's sharded_state_dict (what a dist checkpoint saves)."""
    state = {}
    for chunk in chunks:
        state.update({k: v for k, v in chunk.sharded_state_dict().items() if ".lora_" in k})
    return state


def checkpoint_roundtrip(chunks, adapters: dict, ckpt_dir: str) -> dict:
    """The first layout saves the adapters' sharded state with dist_checkpointing; later layouts zero
    their adapters, load that checkpoint, and must get `adapters` back exactly."""
    import os

    from megatron.core import dist_checkpointing

    state = adapter_sharded_state(chunks)
    if not os.path.exists(os.path.join(ckpt_dir, "done")):
        if torch.distributed.get_rank() == 0:
            os.makedirs(os.path.join(ckpt_dir, "ckpt"), exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, os.path.join(ckpt_dir, "ckpt"))
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            open(os.path.join(ckpt_dir, "done"), "w").close()
        torch.distributed.barrier()
        return {}
    params = {k: v.data for k, v in state.items()}
    with torch.no_grad():
        for p in params.values():
            p.zero_()
    loaded = dist_checkpointing.load(state, os.path.join(ckpt_dir, "ckpt"))
    with torch.no_grad():
        for k, t in loaded.items():
            params[k].copy_(t)
    back = full_adapter_state(chunks)
    return {
        "ckpt_roundtrip": max(float((back[k] - adapters[k]).abs().max()) for k in adapters),
    }


def run_layout(layout, experts, ref_sd, refs, cfg, cfg_dict, check_grads, check_steps, first_init, ckpt_dir):
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
    if ckpt_dir and experts:
        result.update(checkpoint_roundtrip(chunks, adapters, ckpt_dir))
        load_full_adapter_state(chunks, adapters)  # the checks below never see a bad load's adapters
        if torch.distributed.get_rank() == 0 and "ckpt_roundtrip" not in result:
            entries = adapter_sharded_state(chunks).values()
            print(
                "adapter checkpoint keys (rank 0):",
                sorted({(e.key, tuple(getattr(e, "global_shape", ()))) for e in entries}),
                flush=True,
            )
    if experts not in refs:
        refs[experts] = merge_adapters(build_reference_model(cfg_dict, seed=0), adapters, cfg)
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


# ---- through the trainer: SFT (block diffusion and full, packed rows) and DPO --------------------


def trainer_overrides(layout: str) -> list[str]:
    tp, ep, pp = layout.split(",")
    return [
        f"parallel.tp={tp}",
        f"parallel.ep={ep}",
        f"parallel.pp={pp}",
        "lora.enabled=true",
        "lora.experts=true",
        f"lora.rank={RANK}",
        f"lora.alpha={ALPHA}",
        "checkpoint.save_dir=",
        "logging.progress_bar=false",
    ]


def adapted_trainer(config: str, overrides: list[str]):
    """A LoRA Trainer whose adapters are the fixed non-zero test adapters."""
    trainer = Trainer(load_config(config, overrides))
    adapters = test_adapters({k: v.shape for k, v in full_adapter_state(trainer.chunks).items()})
    load_full_adapter_state(trainer.chunks, adapters)
    return trainer, adapters


def sft_reference_loss(trainer, ref) -> float:
    """The trainer's first global batch through the (merged) reference; backward into ref's grads."""
    d = trainer.cfg.diffusion
    batch = prepare_micro_batch(trainer.dataset.global_batch(0, 0), d, trainer.mask_id, trainer.cfg.train.seed)
    logits = torch.cat(
        [
            ref(batch["input_ids"][i : i + 1], batch["position_ids"][i : i + 1], batch["allowed"][i : i + 1]).logits
            for i in range(batch["input_ids"].shape[0])
        ]
    )
    _, stats = masked_diffusion_loss(
        logits[:, : batch["targets"].shape[1]],
        batch["targets"],
        batch["masked"],
        batch["t"],
        batch["loss_mask"],
        doc_ids=batch["doc_ids"],
        loss_weight=d.loss_weight,
        normalize=d.normalize,
        confidence_beta=d.confidence_beta,
        edited=batch["edited"],
        edit_weight=d.edit_weight,
    )
    loss = (stats["numerator"] + d.confidence_beta * stats["cap_numerator"]) / stats["denominator"]
    loss.backward()
    assert int(batch["doc_ids"].max()) > 0, "the rows must be packed (several documents per row)"
    return float(loss)


def trainer_checks(config: str, dpo_config: str | None, hf_dir: str, layout: str) -> dict:
    result = {}
    over = trainer_overrides(layout)
    for mode in ("block_diffusion", "full"):
        trainer, adapters = adapted_trainer(
            config, over + [f"diffusion.mode={mode}", "parallel.use_distributed_optimizer=false"]
        )
        loss, _ = trainer.forward_backward_step(trainer._micro_batches())
        got = full_adapter_state(trainer.chunks, value=lambda p: p.main_grad)
        ref = merge_adapters(load_reference_model(hf_dir), adapters, trainer.model_cfg)
        ref_loss = sft_reference_loss(trainer, ref)
        result[f"{mode}_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
        result[f"{mode}_grad_rel"] = adapter_grad_error(got, adapters, hf_grads_of(ref), trainer.model_cfg)
        trainer.close()
    # five trainer steps (distributed optimizer, block diffusion): the base does not move at all
    trainer, _ = adapted_trainer(config, over)
    frozen = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters() if not p.requires_grad}
    losses = [trainer.train_step().loss for _ in range(5)]
    now = dict(p for c in trainer.chunks for p in c.named_parameters())
    result["trainer_base_changed"] = sum(not torch.equal(now[n], t) for n, t in frozen.items())
    result["trainer_loss_not_lower"] = float(losses[-1] >= losses[0])
    trainer.close()
    if dpo_config:
        result.update(dpo_check(dpo_config, hf_dir, over))
    return result


def dpo_check(dpo_config: str, hf_dir: str, over: list[str]) -> dict:
    """One DPO step of LoRA adapters (live reference = the frozen base, without adapters) vs a plain
    DPO on the reference model with the merged weights as the policy."""
    from dpo_check import plain_dpo_loss_and_grads  # the DPO worker next to this one

    trainer, adapters = adapted_trainer(dpo_config, over + ["parallel.use_distributed_optimizer=false"])
    loss, _, _ = trainer.objective.forward_backward_step(trainer._micro_batches())
    got = full_adapter_state(trainer.chunks, value=lambda p: p.main_grad)
    policy = merge_adapters(load_reference_model(hf_dir), adapters, trainer.model_cfg).state_dict()
    ref_loss, hf_grads = plain_dpo_loss_and_grads(trainer, hf_dir, policy, 0, 0)
    trainer.close()
    return {
        "dpo_loss_rel": abs(loss - ref_loss) / abs(ref_loss),
        "dpo_grad_rel": adapter_grad_error(got, adapters, hf_grads, trainer.model_cfg),
        "dpo_loss_minus_log2": abs(loss - math.log(2.0)),
    }


def reduced_max(local: dict) -> dict:
    """Each value's maximum over all ranks (every check is a 'worst' or a count)."""
    out = {}
    for key, value in sorted(local.items()):
        t = torch.tensor(float(value))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        out[key] = float(t)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="'tp,ep,pp[,dense];...'")
    parser.add_argument("--grad-layouts", default="")
    parser.add_argument("--step-layouts", default="")
    parser.add_argument("--ckpt-dir", help="empty dir: the first layout saves the adapters, later ones load them")
    parser.add_argument("--trainer-config", help="training YAML (tiny model, packed SFT rows)")
    parser.add_argument("--dpo-config", help="training YAML of a DPO run on preference pairs")
    parser.add_argument("--hf-dir", help="the tiny HF model dir both YAMLs use")
    parser.add_argument("--trainer-layouts", default="", help="'tp,ep,pp;...' for the trainer checks")
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
            args.ckpt_dir,
        )
        reduced = reduced_max(local)
        name = f"{layout}" + ("" if experts else ",dense")
        results[name] = reduced
        if torch.distributed.get_rank() == 0:
            print(name, reduced, flush=True)
    for layout in filter(None, args.trainer_layouts.split(";")):
        local = reduced_max(trainer_checks(args.trainer_config, args.dpo_config, args.hf_dir, layout))
        results[f"trainer {layout}"] = local
        if torch.distributed.get_rank() == 0:
            print(f"trainer {layout}", local, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
