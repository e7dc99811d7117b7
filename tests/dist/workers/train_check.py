"""torchrun worker for the trainer's acceptance checks (several layouts per launch).

--check step_parity: one block-diffusion and one full-attention step at each layout; loss and
    every parameter gradient vs the reference model computing the same loss on the same noised
    global batch. Writes {layout: {mode: {"loss_rel": .., "grad_rel": ..}}}.
--check losses: N training steps at each layout; writes {layout: [loss per step]}.
--check device_audit: one step of each mode/backend under megadiff.platform.device_audit (the
    run device is a pretend second CPU device); writes {layout: {case: [violations]}}.
--check family_step: step_parity for other model families in one launch (--runs: a JSON list of
    {name, config, hf_dir, layouts, modes}); the reference is the family's plain model
    (ModelFamily.build_reference, HF names). Writes {name: {layout: {mode: {...}}}}, each with the
    run's resolved diffusion section and the number of masked prompt tokens.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.diffusion.loss import masked_diffusion_loss  # noqa: E402
from megadiff.hf import load_reference_model  # noqa: E402
from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config  # noqa: E402
from megadiff.models.common.hf_weights import gather_hf_state  # noqa: E402
from megadiff.models.registry import family_for_config  # noqa: E402
from megadiff.training.batch import loss_positions, prepare_micro_batch  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402


def parse_layouts(text):
    out = []
    for item in filter(None, text.split(";")):
        tp, ep, pp, *vpp = item.split(",")
        out.append(
            [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.pp={pp}"]
            + ([f"parallel.vpp={vpp[0]}"] if vpp else [])
        )
    return out


def reference_loss_and_grads(trainer, hf_dir, diffusion=None, embedding_noise=None):
    """The reference's loss and gradients on the trainer's global batch 0; `diffusion`: the phase's
    section (default the config's); `embedding_noise(batch, raw)`: [B, S_in, H] added to the
    reference's embedding output (diffusion.mask_embedding_noise), or None."""
    cfg = trainer.cfg
    d = diffusion or cfg.diffusion
    ref = family_reference(hf_dir)
    raw = trainer.dataset.global_batch(0, 0)
    batch = prepare_micro_batch(raw, d, trainer.mask_id, cfg.train.seed)
    noise = embedding_noise(batch, raw) if embedding_noise is not None else None
    row_noise = []
    if noise is not None:
        ref.model.word_embeddings.register_forward_hook(lambda module, args, out: out + row_noise[0])
    logits = []
    for i in range(batch["input_ids"].shape[0]):
        row_noise[:] = [noise[i : i + 1]] if noise is not None else []
        logits.append(
            ref(batch["input_ids"][i : i + 1], batch["position_ids"][i : i + 1], batch["allowed"][i : i + 1]).logits
        )
    logits = torch.cat(logits)
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
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in ref.named_parameters()}
    return float(loss), grads, int(batch["edited"].sum())


def family_reference(hf_dir):
    """The plain reference model of hf_dir's family with its weights (LLaDA2: megadiff.hf's
    loader, which also reads dFactory's merged experts; others: build_reference + a strict load)."""
    hf_config = read_hf_config(hf_dir)
    family = family_for_config(hf_config)
    if family.name == "llada2":
        return load_reference_model(hf_dir)
    ref = family.build_reference(hf_config)
    reader = HFCheckpointReader(hf_dir)
    ref.load_state_dict({name: reader.get(name) for name in reader.names()}, strict=True)
    return ref.eval()


def step_parity(base_cfg, overrides, hf_dir, modes=("block_diffusion", "full")):
    result = {}
    for mode in modes:
        cfg = load_config(
            base_cfg,
            overrides
            + [
                f"diffusion.mode={mode}",
                "parallel.use_distributed_optimizer=false",
                "checkpoint.save_dir=",
                "logging.progress_bar=false",
            ],
        )
        trainer = Trainer(cfg)
        loss, _ = trainer.forward_backward_step(trainer._micro_batches())
        grads = gather_hf_state(
            trainer.chunks,
            trainer.family.mapping,
            trainer.model_cfg,
            value=lambda p: getattr(p, "main_grad", torch.zeros_like(p)),
        )
        ref_loss, ref_grads, edited = reference_loss_and_grads(trainer, hf_dir)
        raw = trainer.dataset.global_batch(0, 0)
        batch = prepare_micro_batch(raw, trainer.cfg.diffusion, trainer.mask_id, trainer.cfg.train.seed)
        grad_rel = max(  # the reference runs on the CPU; the trainer on the run device (GPU in tests/gpu)
            float((grads[n].cpu() - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items()
        )
        result[mode] = {
            "loss": loss,
            "ref_loss": ref_loss,
            "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel": grad_rel,
            "edited_tokens": edited,
            "experts": trainer.experts.backend,
            "diffusion": {
                k: getattr(trainer.cfg.diffusion, k) for k in ("mode", "t_low", "t_high", "loss_weight", "normalize")
            },
            "masked_tokens": int(batch["masked"].sum()),
            "masked_prompt_tokens": int((batch["masked"] & ~batch["loss_mask"]).sum()),
            "grads_compared": len(ref_grads),
        }
    return result


def loss_terms(layout_overrides):
    """diffusion_loss_sums on vocab-sharded logits vs the plain reference loss (values and d/dlogits),
    with CAP on and targets that are the argmax at about half of the masked positions."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from megadiff.models.llada2 import ParallelLayout
    from megadiff.platform import init_distributed, initialize_parallel
    from megadiff.training.loss import diffusion_loss_sums

    tp = int(layout_overrides[0].split("=")[1])
    init_distributed()
    initialize_parallel(ParallelLayout(tp=tp))
    g = torch.Generator().manual_seed(5)
    B, S, V = 2, 12, 512
    logits = torch.randn(B, S, V, generator=g)
    loss_mask = torch.rand(B, S, generator=g) > 0.3
    masked = loss_mask & (torch.rand(B, S, generator=g) > 0.4)
    targets = torch.randint(0, V, (B, S), generator=g)
    take_argmax = torch.rand(B, S, generator=g) > 0.5
    targets = torch.where(take_argmax, logits.argmax(-1), targets)
    t = torch.rand(B, S, generator=g) * 0.5 + 0.3
    doc_ids = (torch.arange(S) >= S // 2).long().expand(B, S).contiguous()
    worst = 0.0
    for normalize, weight in (("masked_tokens", "none"), ("sequence", "inverse_t")):
        d = SimpleNamespace(loss_weight=weight, normalize=normalize, confidence_beta=2.0)
        full = logits.clone().requires_grad_(True)
        _, ref = masked_diffusion_loss(
            full,
            targets,
            masked,
            t,
            loss_mask,
            doc_ids=doc_ids,
            loss_weight=weight,
            normalize=normalize,
            confidence_beta=2.0,
        )
        (ref["numerator"] + 2.0 * ref["cap_numerator"]).backward()
        rank = ps.get_tensor_model_parallel_rank()
        batch = dict(targets=targets, masked=masked, t=t, loss_mask=loss_mask, doc_ids=doc_ids)
        # the positions the loss gathers: computed by the loss, or brought by the batch (the trainer's)
        with_positions = {**batch, **loss_positions({**batch, "edited": torch.zeros_like(masked)})}
        for variant in (batch, with_positions):
            part = logits.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
            ours = diffusion_loss_sums(part, variant, d)
            (ours["numerator"] + 2.0 * ours["cap_numerator"]).backward()
            assert int(ours["correct_tokens"]) == int(ref["cap_denominator"]) > 0
            for key in ("numerator", "cap_numerator"):
                worst = max(worst, abs(float(ours[key]) - float(ref[key])) / abs(float(ref[key])))
            want = full.grad.chunk(tp, dim=-1)[rank]
            worst = max(worst, float((part.grad - want).abs().max() / want.abs().max()))
    return {"rel_err": worst}


AUDIT_CASES = {  # CAP and per-sequence normalisation: the loss's own collectives and tensors
    "bd_dense": ["diffusion.mode=block_diffusion", "model.attention_backend=dense"],
    "bd_flex": ["diffusion.mode=block_diffusion", "model.attention_backend=flex"],
    "full_flex_cap_sequence": [
        "diffusion.mode=full",
        "model.attention_backend=flex",
        "diffusion.confidence_beta=2.0",
        "diffusion.normalize=sequence",
        "diffusion.loss_weight=inverse_t",
    ],
}


def device_audit(base_cfg, overrides):
    """Trainer built and stepped (forward, loss, backward, the loop's collectives) under the audit."""
    from megadiff.platform import init_distributed
    from megadiff.platform.device_audit import DeviceAudit

    init_distributed()
    result = {}
    for case, case_overrides in AUDIT_CASES.items():
        cfg = load_config(base_cfg, overrides + case_overrides + ["checkpoint.save_dir=", "logging.progress_bar=false"])
        with DeviceAudit() as audit:
            trainer = Trainer(cfg)
            audit.place(*trainer.chunks)  # the model lives on the run device (build_model's job on CUDA)
            built = len(audit.violations)
            loss, tokens = trainer.forward_backward_step(trainer._micro_batches())
        result[case] = {
            "violations": audit.violations[built:],
            "build_violations": audit.violations[:built],
            "loss": loss,
            "tokens": tokens,
        }
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--hf-dir")
    parser.add_argument(
        "--check", choices=["step_parity", "losses", "loss_terms", "device_audit", "family_step"], required=True
    )
    parser.add_argument("--layouts")
    parser.add_argument("--runs", help="family_step: JSON list of {name, config, hf_dir, layouts, modes}")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    if args.check == "family_step":
        for run in json.loads(args.runs):
            results[run["name"]] = {}
            for layout in parse_layouts(run["layouts"]):
                key = ",".join(x.split("=")[1] for x in layout)
                overrides = list(args.overrides) + layout
                results[run["name"]][key] = step_parity(run["config"], overrides, run["hf_dir"], run["modes"])
                if torch.distributed.get_rank() == 0:
                    print(run["name"], key, results[run["name"]][key], flush=True)
    for layout in parse_layouts(args.layouts or ""):
        key = ",".join(x.split("=")[1] for x in layout)
        if args.check == "loss_terms":
            results[key] = loss_terms(layout)
        elif args.check == "device_audit":
            results[key] = device_audit(args.config, list(args.overrides) + layout)
        elif args.check == "step_parity":
            results[key] = step_parity(args.config, list(args.overrides) + layout, args.hf_dir)
        else:
            cfg = load_config(args.config, list(args.overrides) + layout + ["logging.progress_bar=false"])
            results[key] = [r.loss for r in Trainer(cfg).run()]
        if torch.distributed.get_rank() == 0:
            print(key, results[key], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
