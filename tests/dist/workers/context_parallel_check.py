"""torchrun worker: context parallelism (parallel.cp) against the single-process reference.

--parity, per layout ("cp=2,tp=2;cp=4;...") and diffusion mode (--modes: block_diffusion, full), one
Trainer on the packed rows of the tiny run dir (extra overrides from the command line):
- logits: the x_t logits of the trainer's model for its first step's CP-split micro-batches,
  gathered over TP and CP, vs the reference's on the whole rows with the dense mask: max |Δ|.
  logits_wrong_rank_mask (block diffusion): the same with every rank given the next rank's
  local-query mask (a control: it must not match, so the comparison can fail);
- loss_rel / grad_rel: that step's loss and every gradient (HF names) vs the reference computing the
  same loss on the same global batch (tests/dist/workers/train_check.reference_loss_and_grads).
--losses, per layout: the trainer's loss at each of its steps.
--resume "A>B": --resume-steps steps at layout A into a save_dir, then the run resumed at layout B.
Rank 0 writes {"parity <layout>" | "losses <layout>" | "resume A>B": result} as JSON to --out.
"""

import argparse
import json
import os
import sys
import tempfile

# the repo root: the worker imports shared test code (tests.*) and runs with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook

install_import_hook()  # first, before anything imports megatron-core

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megadiff.diffusion.block_mask import block_mask_for
from megadiff.hf import load_reference_model
from megadiff.models.common.context_parallel import zigzag_positions
from megadiff.models.common.schedule import forward_backward
from megadiff.models.llada2.hf_mapping import gather_hf_state
from megadiff.platform import init_distributed
from megadiff.training.batch import prepare_micro_batch
from megadiff.training.config import load_config
from megadiff.training.loop import Trainer
from tests.dist.workers.train_check import reference_loss_and_grads

MODES = ("block_diffusion", "full")


def parse_layouts(text: str) -> list[tuple[str, list[str]]]:
    """'cp=2,tp=2;cp=4|perf.x=y' -> [('cp=2,tp=2', ['parallel.cp=2', 'parallel.tp=2']), ('cp=4|perf.x=y',
    ['parallel.cp=4', 'perf.x=y'])]: per layout its key and its config overrides."""
    out = []
    for item in filter(None, text.split(";")):
        layout, *extra = item.split("|")
        out.append((item, [f"parallel.{kv}" for kv in layout.split(",")] + extra))
    return out


def x_t_logits(trainer, local_batches: list[dict], seq: int) -> torch.Tensor | None:
    """[rows, S, V]: the x_t logits of the trainer's model for CP-split micro-batches, gathered over
    TP and CP into whole rows (on every rank of the last pipeline stage; None elsewhere)."""
    cp, mode = ps.get_context_parallel_world_size(), trainer.cfg.diffusion.mode
    model_len = 2 * seq if mode == "block_diffusion" else seq
    rows = []

    def loss_fn(batch, output):
        local = gather_from_tensor_model_parallel_region(output).detach()[:, : seq // cp]  # SP pads x_t
        pieces = [torch.empty_like(local) for _ in range(cp)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=ps.get_context_parallel_group())
        whole = torch.empty(local.shape[0], seq, local.shape[-1])
        for r, piece in enumerate(pieces):
            mine = zigzag_positions(model_len, cp, r)
            whole[:, mine[mine < seq]] = piece
        rows.append(whole)
        return output.sum() * 0.0, torch.zeros((), dtype=torch.int), {}

    for c in trainer.chunks:
        c.eval()
    with torch.no_grad():
        forward_backward(trainer.chunks, local_batches, loss_fn, forward_only=True)
    return torch.cat(rows) if rows else None


def with_next_ranks_mask(trainer, batch: dict) -> dict:
    """The control: the micro-batch with the local-query mask of the next CP rank."""
    d, cp = trainer.cfg.diffusion, ps.get_context_parallel_world_size()
    doc = batch["doc_ids"]
    mask = block_mask_for(
        doc, batch["position_ids"][:, : doc.shape[1]], "full" if d.mode == "full" else "bd", d.block_size,
        None, cp, (ps.get_context_parallel_rank() + 1) % cp,
    )  # fmt: skip
    return dict(batch, allowed=mask)


def step_and_logits(args, layout: list[str], mode: str) -> dict:
    """One trainer (this layout, this mode): the x_t logits of its first step's micro-batches vs
    the reference's, then that step's loss and gradients vs the reference's (train_check)."""
    cfg = load_config(
        args.config,
        layout
        + args.overrides
        + [f"diffusion.mode={mode}", "model.attention_backend=flex", "parallel.use_distributed_optimizer=false"]
        + ["checkpoint.save_dir="],
    )
    trainer = Trainer(cfg)
    d = cfg.diffusion
    raws = [next(trainer._data_iter) for _ in range(trainer.dataset.accumulation_steps)]
    local = trainer.prepare_micro_batches(iter(raws))
    whole = [prepare_micro_batch(raw, d, trainer.mask_id, cfg.train.seed) for raw in raws]
    seq = whole[0]["targets"].shape[1]
    ref = load_reference_model(args.hf_dir)
    with torch.no_grad():
        want = torch.cat(
            [ref(b["input_ids"][i : i + 1], b["position_ids"][i : i + 1], b["allowed"][i : i + 1]).logits
             for b in whole for i in range(b["input_ids"].shape[0])]
        )[:, :seq]  # fmt: skip
    out = {}
    got = x_t_logits(trainer, local, seq)
    out["logits"] = float("nan") if got is None else float((got - want).abs().max())
    if mode == "block_diffusion" and ps.get_context_parallel_world_size() > 1:
        got = x_t_logits(trainer, [with_next_ranks_mask(trainer, b) for b in local], seq)
        out["logits_wrong_rank_mask"] = float("nan") if got is None else float((got - want).abs().max())
    loss, _ = trainer.forward_backward_step(local)
    grads = gather_hf_state(
        trainer.chunks, trainer.model_cfg, value=lambda p: getattr(p, "main_grad", torch.zeros_like(p))
    )
    ref_loss, ref_grads, _ = reference_loss_and_grads(trainer, args.hf_dir)
    out["loss_rel"] = abs(loss - ref_loss) / abs(ref_loss)
    out["grad_rel"] = max(
        float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in ref_grads.items()
    )
    out["loss"] = loss
    return out


def reduce_over_ranks(result: dict) -> dict:
    """Per key the worst value over ranks (MIN for the control, which must stay large); NaN (a
    stage without logits) is skipped."""
    out = {}
    for key, value in sorted(result.items()):
        if isinstance(value, dict):
            out[key] = reduce_over_ranks(value)
            continue
        worst_is_small = "wrong" in key
        fill = float("inf") if worst_is_small else float("-inf")
        t = torch.tensor(fill if value != value else float(value), dtype=torch.double)
        op = torch.distributed.ReduceOp.MIN if worst_is_small else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(t, op=op)
        out[key] = float(t)
    return out


def parity(args, layout: list[str]) -> dict:
    return reduce_over_ranks({mode: step_and_logits(args, layout, mode) for mode in args.modes.split(",")})


def losses(args, layout: list[str]) -> list[float]:
    overrides = layout + args.overrides + ["logging.progress_bar=false"]
    return [r.loss for r in Trainer(load_config(args.config, overrides)).run()]


def resumed_losses(args, first: list[str], then: list[str]) -> list[float]:
    """--resume-steps steps at layout `first` into a save_dir, then the rest of the run resumed at `then`."""
    box = [tempfile.mkdtemp(prefix="cp_resume_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    common = args.overrides + ["logging.progress_bar=false", f"checkpoint.save_dir={box[0]}"]
    trainer = Trainer(load_config(args.config, first + common))
    before = [trainer.train_step() for _ in range(args.resume_steps)]  # the whole run's LR schedule
    trainer.save()
    trainer.close()
    after = Trainer(load_config(args.config, then + common)).run()
    return [r.loss for r in before + after]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--parity", default="", help="layouts of the parity check: 'cp=2,tp=2;cp=4|section.key=value'")
    parser.add_argument("--modes", default=",".join(MODES), help="diffusion modes of the parity check")
    parser.add_argument("--losses", default="", help="layouts whose training losses are recorded")
    parser.add_argument(
        "--resume", default="", help="'cp=2>cp=1': --resume-steps steps at the first, resumed at the second"
    )
    parser.add_argument("--resume-steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    init_distributed()
    results = {}
    for key, layout in parse_layouts(args.parity):
        results[f"parity {key}"] = parity(args, layout)
    for key, layout in parse_layouts(args.losses):
        results[f"losses {key}"] = losses(args, layout)
    if args.resume:
        (_, first), (_, then) = (parse_layouts(part)[0] for part in args.resume.split(">"))
        results[f"resume {args.resume}"] = resumed_losses(args, first, then)
    if torch.distributed.get_rank() == 0:
        for key, value in results.items():
            print(key, value, flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
