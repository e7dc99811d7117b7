"""torchrun worker: context parallelism (parallel.cp) against the single-process reference.

--check parity, per layout ("cp=2,tp=2;cp=4;..."):
- logits_bd / logits_full: the model (flex attention) fed each CP rank's zig-zag part of packed rows
  (block diffusion [x_t ; x_0], and full attention), logits gathered over TP and CP, vs the reference
  with the dense mask: max |Δ|. logits_bd_wrong_rank: the same with every rank given the next rank's
  local-query mask (a control: it must not match, so the comparison can fail);
- step: one trainer step per diffusion mode (packed rows of the tiny run dir, extra overrides
  from the command line): loss and every gradient (HF names) vs the reference computing the same
  loss on the same global batch, relative (tests/dist/workers/train_check.step_parity).
--check losses, per layout: the trainer's losses over its steps; with --resume-from-layout the run
  first trains --resume-steps steps at that layout into a save_dir, then resumes at the layout.
Rank 0 writes {layout: result} as JSON to --out.
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
from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
from megadiff.hf import load_reference_model
from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config
from megadiff.models.common.context_parallel import zigzag_positions
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout
from megadiff.models.llada2.hf_mapping import load_hf_into_model
from megadiff.models.llada2.model import build_model
from megadiff.models.llada2.schedule import forward_backward
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.training.config import load_config
from megadiff.training.loop import Trainer
from tests.dist.workers.train_check import step_parity

ROWS, S, BLOCK = 2, 32, 4
DOC_LENGTHS = ([12, 20], [5, 11, 16])  # packed rows; documents cross the zig-zag chunk borders


def parse_layouts(text: str) -> list[dict]:
    """'cp=2,tp=2;cp=4' -> [{'cp': 2, 'tp': 2}, {'cp': 4}]"""
    return [{k: int(v) for k, v in (kv.split("=") for kv in item.split(","))} for item in filter(None, text.split(";"))]


def overrides_of(layout: dict) -> list[str]:
    return [f"parallel.{k}={v}" for k, v in layout.items()]


def packed_inputs(vocab: int):
    g = torch.Generator().manual_seed(7)
    doc = torch.cat([torch.cat([torch.full((n,), d) for d, n in enumerate(row)])[None] for row in DOC_LENGTHS])
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in DOC_LENGTHS])
    x0 = torch.randint(1, vocab, (ROWS, S), generator=g)
    xt = torch.where(torch.rand(ROWS, S, generator=g) < 0.5, torch.zeros_like(x0), x0)  # 0 = "mask"
    return doc, pos, x0, xt


def cp_logits(chunks, ids, pos, doc, mode, rank_offset=0):
    """[ROWS, n, V] logits of the model run CP-split (each row one micro-batch), on every rank;
    None on pipeline stages without the output layer. rank_offset != 0: each rank gets another
    rank's local-query mask (the control)."""
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    n = ids.shape[1]
    mine = zigzag_positions(n, cp, cp_rank)
    mask_rank = (cp_rank + rank_offset) % cp
    micro = [
        dict(
            input_ids=ids[i : i + 1, mine],
            position_ids=pos[i : i + 1],
            allowed=block_mask_for(doc[i : i + 1], pos[i : i + 1, : doc.shape[1]], mode, BLOCK, None, cp, mask_rank),
            row=i,
        )
        for i in range(ROWS)
    ]
    logits = [None] * ROWS

    def loss_fn(batch, output):
        local = gather_from_tensor_model_parallel_region(output)[0].detach()  # [n/cp, V]
        pieces = [torch.empty_like(local) for _ in range(cp)]
        torch.distributed.all_gather(pieces, local, group=ps.get_context_parallel_group())
        full = torch.empty(n, local.shape[-1])
        for r, piece in enumerate(pieces):
            full[zigzag_positions(n, cp, r)] = piece
        logits[batch["row"]] = full
        return output.sum() * 0.0, torch.tensor(1), {}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        forward_backward(chunks, micro, loss_fn, forward_only=True)
    return None if logits[0] is None else torch.stack(logits)


def logits_errors(layout: ParallelLayout, cfg, ref, reader) -> dict:
    chunks = build_model(cfg, layout, attention_backend="flex")
    load_hf_into_model(chunks, reader.get, cfg)
    doc, pos, x0, xt = packed_inputs(cfg.vocab_size)
    cases = {
        "bd": (torch.cat([xt, x0], 1), torch.cat([pos, pos], 1), block_diffusion_mask(doc, pos, BLOCK)),
        "full": (xt, pos, full_attention_mask(doc)),
    }
    out = {}
    for mode, (ids, positions, allowed) in cases.items():
        with torch.no_grad():
            want = ref(ids, positions, allowed).logits
        offsets = {"": 0, "_wrong_rank": 1} if mode == "bd" else {"": 0}
        for suffix, offset in offsets.items():
            got = cp_logits(chunks, ids, positions, doc, mode, offset)
            out[f"logits_{mode}{suffix}"] = float("nan") if got is None else float((got - want).abs().max())
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


def parity(args, layout_kw: dict, model_cfg, ref, reader) -> dict:
    layout = ParallelLayout(**layout_kw)
    initialize_parallel(layout)
    result = logits_errors(layout, model_cfg, ref, reader)
    result["step"] = step_parity(args.config, overrides_of(layout_kw) + args.overrides, args.hf_dir)
    return reduce_over_ranks(result)


def losses(args, layout_kw: dict) -> list[float]:
    overrides = overrides_of(layout_kw) + args.overrides + ["logging.progress_bar=false"]
    if not args.resume_from_layout:
        return [r.loss for r in Trainer(load_config(args.config, overrides)).run()]
    box = [tempfile.mkdtemp(prefix="cp_resume_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    save = [f"checkpoint.save_dir={box[0]}"]
    first = overrides_of(parse_layouts(args.resume_from_layout)[0]) + args.overrides + ["logging.progress_bar=false"]
    before = Trainer(load_config(args.config, first + save + [f"train.steps={args.resume_steps}"])).run()
    after = Trainer(load_config(args.config, overrides + save)).run()
    return [r.loss for r in before + after]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", choices=["parity", "losses"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--layouts", required=True, help="'cp=2,tp=2;cp=4;...'")
    parser.add_argument("--resume-from-layout", help="losses: train --resume-steps steps here first, then resume")
    parser.add_argument("--resume-steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    init_distributed()
    results = {}
    if args.check == "parity":
        model_cfg = LLaDA2ModelConfig.from_hf_dict(read_hf_config(args.hf_dir))
        ref, reader = load_reference_model(args.hf_dir), HFCheckpointReader(args.hf_dir)
    for layout_kw in parse_layouts(args.layouts):
        key = ",".join(f"{k}={v}" for k, v in layout_kw.items())
        if args.check == "parity":
            results[key] = parity(args, layout_kw, model_cfg, ref, reader)
        else:
            results[key] = losses(args, layout_kw)
        if torch.distributed.get_rank() == 0:
            print(key, results[key], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
