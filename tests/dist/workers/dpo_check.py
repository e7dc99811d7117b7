"""torchrun worker for the DPO acceptance checks: every case of --cases in ONE launch.

A case is `tp,ep,pp/mode/reference/micro_batch_size`. For each: step 1 through the trainer (policy
== reference, so the loss must be log 2), then step 2's loss and every parameter gradient against a
plain-PyTorch DPO written here from scratch on the reference model (megadiff.hf) with the
trainer's step-1 weights as the policy and the starting weights as the reference, on the same
noised global batch. Writes {case: {"step1_loss", "loss", "ref_loss", "loss_rel", "grad_rel"}}.
"""

import argparse
import json
import math
import os
import sys

# the repo root: the worker imports shared test code (tests.*) and runs with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megadiff.models.common.hf_weights import gather_hf_state  # noqa: E402
from megadiff.training.batch import prepare_micro_batch  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from tests.dist.workers.train_check import family_reference  # noqa: E402 (any model family's reference)


def plain_elbos(model, batch, pairs: int, mc_samples: int) -> torch.Tensor:
    """[pairs, 2] ELBO estimates, one row of the batch at a time, per response slot."""
    terms = [[[], []] for _ in range(pairs)]
    seq = batch["targets"].shape[1]
    for r in range(batch["input_ids"].shape[0]):
        logits = model(batch["input_ids"][r : r + 1], batch["position_ids"][r : r + 1], batch["allowed"][r : r + 1])
        logits = logits.logits[0, :seq]
        for slot in batch["response_slot"][r].unique().tolist():
            if slot < 0:
                continue
            at = batch["masked"][r] & (batch["response_slot"][r] == slot)
            ce = F.cross_entropy(logits[at], batch["targets"][r][at], reduction="none")
            terms[slot // 2][slot % 2].append(-(ce / batch["t"][r][at]).sum() / mc_samples)
    return torch.stack([torch.stack([torch.zeros(()) + sum(c) for c in pair]) for pair in terms])


def plain_dpo_loss_and_grads(trainer, hf_dir, policy_state, epoch, batch_index):
    cfg = trainer.cfg
    batch = prepare_micro_batch(
        trainer.dataset.global_batch(epoch, batch_index), cfg.diffusion, trainer.mask_id, cfg.train.seed
    )
    raw = trainer.dataset.global_batch(epoch, batch_index)
    batch["response_slot"] = raw["response_slot"]
    pairs = raw["pair_ids"].numel()
    reference = family_reference(hf_dir)
    policy = family_reference(hf_dir)
    with torch.no_grad():
        for name, tensor in policy.state_dict().items():
            if name in policy_state:
                tensor.copy_(policy_state[name])
        ref = plain_elbos(reference, batch, pairs, cfg.dpo.mc_samples)
    pol = plain_elbos(policy, batch, pairs, cfg.dpo.mc_samples)
    z = cfg.dpo.beta * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    eps = cfg.dpo.label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in policy.named_parameters()}
    return float(loss), grads


def run_case(base_cfg, hf_dir, case, overrides):
    layout, mode, reference, mbs = case.split("/")
    tp, ep, pp = layout.split(",")
    cfg = load_config(
        base_cfg,
        overrides
        + [
            f"parallel.tp={tp}",
            f"parallel.ep={ep}",
            f"parallel.pp={pp}",
            f"diffusion.mode={mode}",
            f"dpo.reference={reference}",
            f"train.micro_batch_size={mbs}",
            "parallel.use_distributed_optimizer=false",
            "checkpoint.save_dir=",
            "logging.progress_bar=false",
            "train.objective=dpo",
        ],
    )
    trainer = Trainer(cfg)
    step1 = trainer.train_step()
    table = trainer.family.mapping
    policy_state = gather_hf_state(trainer.chunks, table, trainer.model_cfg)
    loss, _, metrics = trainer.objective.forward_backward_step(trainer._micro_batches())
    grads = gather_hf_state(
        trainer.chunks, table, trainer.model_cfg, value=lambda p: getattr(p, "main_grad", torch.zeros_like(p))
    )
    ref_loss, ref_grads = plain_dpo_loss_and_grads(trainer, hf_dir, policy_state, 0, 1)
    grad_rel = max(
        float((grads[n].cpu() - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items()
    )
    return {
        "step1_loss": step1.loss,
        "step1_minus_log2": abs(step1.loss - math.log(2.0)),
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
        "grad_rel": grad_rel,
        "metrics": metrics,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--cases", required=True, help="';'-separated tp,ep,pp/mode/reference/micro_batch_size")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for case in filter(None, args.cases.split(";")):
        results[case] = run_case(args.config, args.hf_dir, case, list(args.overrides))
        if torch.distributed.get_rank() == 0:
            print(case, results[case], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
