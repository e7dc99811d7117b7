"""torchrun worker for continued pretraining (issue 27), several layouts per launch.

--check parity: at each layout one Trainer on indexed data with a four-phase block schedule (bd1, bd4,
    full, bd32; embedding noise in the first two); at each phase, one micro-batch step of global batch
    0 (packed documents, every token a target) against the reference model computing the same loss on
    the same noised batch with the same embedding noise. Writes {layout: {phase: {loss_rel, grad_rel,
    min_documents_per_row, all_targets, noised}}}.
--check resume: a straight 6-step run; a run stopped and saved after step 4 (inside phase 2) and
    resumed in a new Trainer, whose step-4 checkpoint is also copied to WORK/other_dp. Launched
    again (one layout) with WORK/other_dp there: that checkpoint resumed at this launch's DP size.
    Writes the runs' (step, phase, loss, lr) and their valid_loss (logged, or recorded by the saves).
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.checkpoint.format import read_meta, resolve_checkpoint_dir  # noqa: E402
from megadiff.models.llada2.hf_mapping import gather_hf_state  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.embedding_noise import embedding_noise  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from tests.dist.workers.train_check import parse_layouts, reference_loss_and_grads  # noqa: E402

PHASES = "[{steps: 1, block_size: 1}, {steps: 1, block_size: 4}, {steps: 1, mode: full}, {steps: 1, block_size: 32}]"
REFERENCE_DIFFUSION = [("block_diffusion", 1), ("block_diffusion", 4), ("full", 32), ("block_diffusion", 32)]
NOISE = "{std: 0.5, steps: 2}"
QUIET = ["logging.progress_bar=false"]


def parity(base_cfg, layout, hf_dir):
    overrides = layout + QUIET + ["parallel.use_distributed_optimizer=false", "checkpoint.save_dir="]
    overrides += [f"diffusion.block_schedule={PHASES}", "train.steps=4", f"diffusion.mask_embedding_noise={NOISE}"]
    trainer = Trainer(load_config(base_cfg, overrides))
    result = {}
    for step in range(4):
        trainer.step = step  # the phase (and the noise) follow the step
        trainer.dataset.load_state_dict({"consumed_samples": 0})  # every phase trains global batch 0
        micro = trainer.prepare_micro_batches(iter(trainer.dataset))
        loss, _ = trainer.forward_backward_step(micro)
        grads = gather_hf_state(
            trainer.chunks, trainer.model_cfg, value=lambda p: getattr(p, "main_grad", torch.zeros_like(p))
        )
        if torch.distributed.get_rank() != 0:
            continue  # every rank gathered the same gradients; one computes the reference and writes
        noised = step < 2  # NOISE's steps
        std = 0.5
        mode, block = REFERENCE_DIFFUSION[step]  # written out here, not taken from the trainer's phases
        reference = dataclasses.replace(trainer.cfg.diffusion, mode=mode, block_size=block)

        def noise(batch, raw, step=step, noised=noised, std=std):
            hidden = trainer.model_cfg.hidden_size
            return embedding_noise(batch, raw, hidden, std, trainer.cfg.train.seed, step) if noised else None

        ref_loss, ref_grads, _ = reference_loss_and_grads(trainer, hf_dir, diffusion=reference, embedding_noise=noise)
        grad_rel = max(
            float((grads[n].cpu() - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items()
        )
        raw = trainer.dataset.global_batch(0, 0)
        result[trainer.phase.name] = {
            "loss": loss,
            "ref_loss": ref_loss,
            "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel": grad_rel,
            "min_documents_per_row": min(len(set(row.tolist())) for row in raw["doc_ids"]),
            "all_targets": bool(raw["loss_mask"].all()),
            "noised": noised,
            "input_len": int(micro[0]["input_ids"].shape[1]),
        }
    trainer.close()
    return result


def recorded_valid_losses(save_dir, iterations):
    return {it: read_meta(resolve_checkpoint_dir(save_dir, it))["extra"].get("valid_loss") for it in iterations}


def logged_valid_losses(metrics_file):
    with open(metrics_file) as f:
        return {r["step"]: r["valid_loss"] for r in map(json.loads, f) if "valid_loss" in r}


def resume(base_cfg, layouts, work):
    """Phases bd1 (steps 1-2), bd4 (3-5), full (6); the stopped run saves after step 4."""
    common = QUIET + ["train.eval_interval=2", "train.eval_iters=1"]

    def config(name, layout, save=True):
        where = [f"checkpoint.save_dir={os.path.join(work, name)}", "checkpoint.save_interval=4"] if save else []
        return load_config(base_cfg, layout + common + where + [f"logging.metrics_file={work}/{name}.jsonl"])

    def steps_of(results):
        return [(r.step, r.phase, r.loss, r.lr) for r in results]

    rank0 = os.environ.get("RANK", "0") == "0"  # the process group starts with the first Trainer
    if len(layouts) == 1 and os.path.isdir(os.path.join(work, "other_dp")):  # the second launch
        out = {"resumed_other_dp": steps_of(Trainer(config("other_dp", layouts[0])).run())}
        out["valid_other_dp"] = logged_valid_losses(f"{work}/other_dp.jsonl") if rank0 else None
        return out
    out = {"straight": steps_of(Trainer(config("straight", layouts[0], save=False)).run())}
    out["valid_straight"] = logged_valid_losses(f"{work}/straight.jsonl") if rank0 else None
    stopped = Trainer(config("stopped", layouts[0]))
    first = [stopped.train_step() for _ in range(4)]
    stopped.save()  # after step 4: inside phase 2 (steps 3..5)
    stopped.close()
    stopped_dir = os.path.join(work, "stopped")
    if rank0:  # the same checkpoint, for a second launch at another DP size
        other_dir = os.path.join(work, "other_dp")
        os.makedirs(other_dir)
        shutil.copytree(os.path.join(stopped_dir, "iter_0000004"), os.path.join(other_dir, "iter_0000004"))
        shutil.copy(os.path.join(stopped_dir, "latest_checkpointed_iteration.txt"), other_dir)
    out["resumed"] = steps_of(first) + steps_of(Trainer(config("stopped", layouts[0])).run())
    out["valid_resumed"] = recorded_valid_losses(stopped_dir, (4, 6))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--hf-dir")
    parser.add_argument("--check", choices=["parity", "resume"], required=True)
    parser.add_argument("--layouts", required=True)
    parser.add_argument("--work", help="resume: where the runs' checkpoints go")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layouts = parse_layouts(args.layouts)
    if args.check == "parity":
        results = {}
        for layout in layouts:
            key = ",".join(x.split("=")[1] for x in layout)
            results[key] = parity(args.config, layout, args.hf_dir)
            if torch.distributed.get_rank() == 0:
                print(key, results[key], flush=True)
    else:
        results = resume(args.config, layouts, args.work)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
