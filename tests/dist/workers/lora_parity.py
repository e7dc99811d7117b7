"""torchrun worker: LoRA on megadiff's LLaDA2 vs the reference model at several layouts in one launch.

Every layout adapts the same modules and loads the same non-zero adapters (B != 0, drawn once from
a fixed seed, via load_full_adapter_state). Two oracles, both the plain-PyTorch reference (the
tiny HF dir --hf-dir) carrying those adapters: `peft` (the adapters written as a PEFT adapter by
megadiff.lora.peft_format.to_peft and loaded by peft's LoraModel) and `merged` (W + (alpha/r) * B @ A
on the megatron-core tensor, mapped to HF names by the parameter table). Checks per layout (rank 0
writes the worst values over ranks as JSON to --out):
- logits_plain / logits_masked (+ _merged): max |logit diff| (plain input; a random mask with
  repeated positions);
- full_state_roundtrip: full_adapter_state gives back exactly the adapters that were loaded;
- init_layout_independent: the adapters apply_lora drew equal the first layout's (max |diff|);
- ckpt_roundtrip (--ckpt-dir): the first layout saves the adapter entries of model.sharded_state_dict()
  with dist_checkpointing, later layouts load them (max |diff| to what was saved);
- grad_rel_err (+ _merged) (--grad-layouts): adapter gradients of sum(logits * W) vs the PEFT
  model's lora grads mapped back to megatron layout (resp. those implied by the merged model's
  weight gradient G: dA = s B^T G, dB = s G A^T);
- base_changed / adapters_unmoved (--step-layouts): after 5 optimizer steps (the trainer's DDP and
  distributed Adam, lr 1e-2) how many frozen tensors differ at all and how many adapter tensors
  did not change (both must be 0); optimizer_bytes_ratio: LoRA optimizer bytes / full fine-tuning's.
--trainer-layouts: the same adapters through the Trainer (block diffusion and full, packed rows;
5 steps; one DPO step) against the merged reference.
"""

import argparse
import json
import math
import os
import sys
import tempfile

# the repo root: the worker imports shared test code (tests.*) and runs with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megadiff.diffusion.loss import masked_diffusion_loss  # noqa: E402
from megadiff.hf import load_reference_model  # noqa: E402
from megadiff.hf.checkpoint_reader import read_hf_config  # noqa: E402
from megadiff.lora.apply import apply_lora  # noqa: E402
from megadiff.lora.peft_format import PEFT_PREFIX, adapted_modules, hf_modules, to_peft, write_peft_adapter  # noqa: E402
from megadiff.lora.state import full_adapter_state, load_full_adapter_state  # noqa: E402
from megadiff.models.common.schedule import forward_backward  # noqa: E402
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout  # noqa: E402
from megadiff.models.llada2.hf_mapping import (  # noqa: E402
    full_mcore_from_hf,
    hf_names,
    load_hf_into_model,
    rule_for,
)
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.training.batch import prepare_micro_batch  # noqa: E402
from megadiff.training.config import TrainingConfig, load_config  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from megadiff.training.mcore_configs import ddp_config, optimizer_config  # noqa: E402
from megadiff.training.optimizer_memory import optimizer_state_bytes  # noqa: E402
from tests.lora.peft_reference import merged_reference, peft_reference  # noqa: E402

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


def reference_rows(ref, ids, pos, allowed) -> list[torch.Tensor]:
    """The reference's logits row by row (megatron-core micro-batches are single rows)."""
    with torch.no_grad():
        return [
            ref(
                input_ids=ids[i : i + 1],
                position_ids=pos[i : i + 1],
                attention_mask=None if allowed is None else allowed[i : i + 1],
            ).logits[0]
            for i in range(B)
        ]


def logits_errors(chunks, expected: dict[str, list], ids, pos, allowed) -> dict[str, float]:
    """max |logit diff| of the model vs each reference's rows in `expected` (name -> rows)."""

    def loss_fn(batch, output):
        full = gather_from_tensor_model_parallel_region(output)[0].detach()
        diffs = {name: (full - rows[batch["row"]]).abs().max() for name, rows in expected.items()}
        return output.sum() * 0.0, torch.tensor(1), diffs

    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = forward_backward(chunks, micro_batches(ids, pos, allowed), loss_fn, forward_only=True)
    return {name: max([float(o[name]) for o in out], default=0.0) for name in expected}


def weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights):
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    vocab = slice(tp_rank * cfg.vocab_size // tp, (tp_rank + 1) * cfg.vocab_size // tp)

    def loss_fn(batch, output):
        return (output * weights[batch["row"] : batch["row"] + 1, :, vocab]).sum(), torch.tensor(1), {}

    for c in chunks:
        c.train()
        c.zero_grad_buffer()
    forward_backward(chunks, micro_batches(ids, pos, allowed), loss_fn, forward_only=False)


def peft_adapter_grads(peft_model, adapters: dict, lora_cfg: dict, cfg) -> dict:
    """The PEFT reference's lora grads mapped back to megatron names and layout: B like its base
    weight (the table's transform), fc1's A = gate_proj's + up_proj's (one A feeds both in megatron)."""
    grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if ".lora_" in n}
    full = {}
    for path in adapted_modules(lora_cfg, cfg):
        rule, names = hf_modules(path, cfg)
        a = [grads[f"{PEFT_PREFIX}{n}.lora_A.weight"] for n in names]
        b = [grads[f"{PEFT_PREFIX}{n}.lora_B.weight"] for n in names]
        shape_a, shape_b = adapters[path + ".lora_A.weight"].shape, adapters[path + ".lora_B.weight"].shape
        a = [g if g is not None else torch.zeros(shape_a) for g in a]  # expert never routed
        b = [g if g is not None else torch.zeros(shape_b[0] // len(names), shape_b[1]) for g in b]
        full[path + ".lora_A.weight"] = sum(a)
        full[path + ".lora_B.weight"] = full_mcore_from_hf(rule, b, cfg)
    return full


def relative_errors(got: dict, want: dict) -> float:
    worst = 0.0
    for name, w in want.items():
        err = float((got[name].cpu() - w).abs().max() / w.abs().max().clamp_min(1e-12))
        if err > 1e-5 and torch.distributed.get_rank() == 0:
            print(f"gradient mismatch {name}: rel {err:.3g}", flush=True)
        worst = max(worst, err)
    return worst


def gradient_errors(chunks, refs: dict, adapters, lora_cfg, cfg, ids, pos, allowed) -> dict:
    """Adapter grads of sum(logits * W) / B vs the PEFT reference's and the merged reference's."""
    weights = torch.randn(B, S, cfg.vocab_size, generator=torch.Generator().manual_seed(11))
    for ref in refs.values():
        ref.zero_grad()
        logits = ref(input_ids=ids, position_ids=pos, attention_mask=allowed).logits
        ((logits * weights).sum() / B).backward()
    weighted_loss_backward(chunks, cfg, ids, pos, allowed, weights)
    got = full_adapter_state(chunks, value=lambda p: p.main_grad)
    return {
        "grad_rel_err": relative_errors(got, peft_adapter_grads(refs["peft"], adapters, lora_cfg, cfg)),
        "grad_rel_err_merged": adapter_grad_error(got, adapters, hf_grads_of(refs["merged"]), cfg),
    }


def is_adapter(param_name: str) -> bool:
    return ".lora_A." in param_name or ".lora_B." in param_name


def train_steps(chunks, cfg, ids, variant, steps=5) -> dict:
    from megatron.core.optimizer import get_megatron_optimizer

    tcfg = TrainingConfig()
    tcfg.train.lr, tcfg.train.clip_grad = 1e-2, 0.0
    optimizer = get_megatron_optimizer(optimizer_config(tcfg, torch.float32), chunks)
    # by name, not by requires_grad: a base weight left trainable by mistake must count as base
    frozen = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if not is_adapter(n)}
    adapters = {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if is_adapter(n)}
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
    # adapters on routed experts need megatron-core's SequentialMLP (grouped experts skip them)
    moe_experts = "sequential" if experts else "auto"
    chunks = build_model(cfg, layout, moe_experts=moe_experts, calculate_per_token_loss=True)
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


def build_references(hf_dir: str, adapters: dict, lora_cfg: dict, hf_config: dict) -> dict:
    """The two oracles for one adapter set: the reference with the PEFT adapter loaded by peft
    (written by megadiff.lora.peft_format.to_peft), and the reference with merged weights."""
    adapter_dir = os.path.join(tempfile.mkdtemp(), "peft")
    write_peft_adapter(adapter_dir, *to_peft(adapters, lora_cfg, hf_config))
    peft = peft_reference(hf_dir, adapter_dir)
    for name, p in peft.named_parameters():  # loaded for inference: make the adapters trainable
        p.requires_grad_(".lora_" in name)
    return {
        "peft": peft,
        "merged": merged_reference(hf_dir, adapters, lora_cfg, hf_config),
        "rows": {},
    }


def run_layout(layout, experts, ref_sd, refs, cfg, cfg_dict, check_grads, check_steps, first_init, ckpt_dir, hf_dir):
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
        refs[experts] = build_references(hf_dir, adapters, lora_settings(experts), cfg_dict)
    ref = refs[experts]
    chunks = wrap_ddp(chunks)  # plain DDP: every rank's main_grad is the whole reduced gradient
    ids, variants = make_inputs(cfg.vocab_size)
    for name, pos, allowed in variants:
        expected = ref["rows"].setdefault(
            name, {k: reference_rows(ref[k], ids, pos, allowed) for k in ("peft", "merged")}
        )
        errors = logits_errors(chunks, expected, ids, pos, allowed)
        result[f"logits_{name}"], result[f"logits_{name}_merged"] = errors["peft"], errors["merged"]
    if check_grads:
        models = {k: ref[k] for k in ("peft", "merged")}
        result.update(gradient_errors(chunks, models, adapters, lora_settings(experts), cfg, ids, *variants[1][1:]))
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
            ref(
                input_ids=batch["input_ids"][i : i + 1],
                position_ids=batch["position_ids"][i : i + 1],
                attention_mask=batch["allowed"][i : i + 1],
            ).logits
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
    modes = {
        "block_diffusion": ["diffusion.mode=block_diffusion"],
        "full": ["diffusion.mode=full"],
        # CAP's confidence term and complementary masks (the second half of the rows)
        "block_diffusion_cap": [
            "diffusion.mode=block_diffusion",
            "diffusion.complementary_masks=true",
            "diffusion.confidence_beta=2.0",
        ],
    }
    for mode, settings in modes.items():
        trainer, adapters = adapted_trainer(config, over + settings + ["parallel.use_distributed_optimizer=false"])
        loss, _ = trainer.forward_backward_step(trainer._micro_batches())
        got = full_adapter_state(trainer.chunks, value=lambda p: p.main_grad)
        ref = merged_reference(hf_dir, adapters, trainer.cfg.lora.adapter_config(), trainer.hf_config)
        ref_loss = sft_reference_loss(trainer, ref)
        result[f"{mode}_loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
        result[f"{mode}_grad_rel"] = adapter_grad_error(got, adapters, hf_grads_of(ref), trainer.model_cfg)
        trainer.close()
    # five trainer steps (distributed optimizer, block diffusion): the base does not move at all
    trainer, _ = adapted_trainer(config, over)
    frozen = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters() if not is_adapter(n)}
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
    policy = merged_reference(hf_dir, adapters, trainer.cfg.lora.adapter_config(), trainer.hf_config).state_dict()
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
    parser.add_argument("--hf-dir", required=True, help="the tiny HF model dir (the base; both YAMLs use it)")
    parser.add_argument("--trainer-layouts", default="", help="'tp,ep,pp;...' for the trainer checks")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    cfg_dict = read_hf_config(args.hf_dir)
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    ref_sd = load_reference_model(args.hf_dir).state_dict()
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
            args.hf_dir,
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
