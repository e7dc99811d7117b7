"""Compare megadiff's model (any family, any TP/EP/PP/VPP/CP layout) with its plain-PyTorch reference.

The family (LLaDA2, LLaDA, LLaDA-MoE, ...) comes from config.json's model_type; the megatron model is
built and loaded through the family's mapping objects, the reference is the family's own with HF names.

Run under torchrun, one process per rank of the layout, e.g.
  torchrun --nproc-per-node 4 tools/compare_logits.py --hf-dir MODEL --tp 2 --ep 2 \
      --input-ids ids.json --tolerance 1e-4
Prints max |logit difference| per row and exits 1 above --tolerance, 2 on bad input. The fp32
reference (about 64 GB for LLaDA2-mini) is built once, on rank 0, which compares; every rank gets
the verdict.
"""

import argparse
import json
import os
import sys

from megadiff.cli.layout_args import add_layout_arguments, layout_from_args
from megadiff.errors import UserError, user_error_exit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors): the reference")
    p.add_argument("--mcore-dir", help="megatron checkpoint to test instead of the HF weights (converted or trained)")
    p.add_argument("--iteration", type=int, help="checkpoint iteration (default: latest complete)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load --mcore-dir without vetting its pickles (only for checkpoints you made, e.g. TE FP8)",
    )
    p.add_argument("--input-ids", required=True, help="JSON file: list of lists of token ids")
    p.add_argument("--position-ids", help="JSON file: list of lists, same shape (default 0..n-1)")
    add_layout_arguments(p, context_parallel=True)
    p.add_argument(
        "--moe-experts",
        default="auto",
        choices=["auto", "te", "grouped", "sequential"],
        help="routed experts: te (Transformer Engine), grouped (torch._grouped_mm), sequential (one GEMM per "
        "expert); auto = te where megatron-core can use TE, else grouped where it runs, else sequential "
        "(default: %(default)s; as the trainer's perf.moe_experts)",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |Δ| allowed (fp32)")
    p.add_argument("--save-logits", help="write megadiff's fp32 logits [batch, seq, vocab] here (rank 0)")
    return p.parse_args(argv)


def read_rows(path, what):
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read {what}: {e}") from None
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, list) and r and all(isinstance(x, int) for x in r) for r in rows)
    ):
        raise UserError(f"{path}: {what} must be a non-empty list of non-empty lists of ints")
    return rows


def main(argv=None):
    """0: logits match; 1: they differ beyond --tolerance; 2: bad input (one line on stderr)."""
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    from megadiff.platform.rank_output import warnings_from_rank0_only

    warnings_from_rank0_only()  # a torchrun tool: third-party warnings once, from rank 0
    args = parse_args(argv)
    try:
        return compare(args)
    except UserError as e:
        return user_error_exit(e)


def compare(args) -> int:
    # the input files first: a typo there is reported before megatron-core is even imported
    ids_rows = read_rows(args.input_ids, "input ids")
    pos_rows = (
        read_rows(args.position_ids, "position ids") if args.position_ids else [list(range(len(r))) for r in ids_rows]
    )
    if [len(r) for r in pos_rows] != [len(r) for r in ids_rows]:
        raise UserError(f"{args.position_ids}: rows must have the same lengths as {args.input_ids}")
    import torch

    from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match, read_hf_config
    from megadiff.models.registry import family_for_config

    cfg_dict = read_hf_config(args.hf_dir)
    source = os.path.join(args.hf_dir, "config.json")
    family = family_for_config(cfg_dict, source)
    cfg = family.config_from_hf(cfg_dict, source)
    layout = layout_from_args(args)
    cfg.validate_layout(layout)
    if max(max(r) for r in ids_rows) >= cfg.vocab_size or min(min(r) for r in ids_rows) < 0:
        raise UserError(f"{args.input_ids}: token ids must be in [0, {cfg.vocab_size})")
    if args.save_logits:
        from megadiff.files.outputs import check_output_file, refuse_overlaps

        inputs = [("--hf-dir", args.hf_dir), ("--mcore-dir", args.mcore_dir), ("--input-ids", args.input_ids)]
        refuse_overlaps([("--save-logits", args.save_logits)], inputs + [("--position-ids", args.position_ids)])
        check_output_file(args.save_logits, "--save-logits")
    # before any model is built: the weights hold every tensor config.json implies, with its shape
    # (in any of the family's dir layouts, e.g. LLaDA2's split or merged experts: hf_format)
    reader, layout_of_dir = HFCheckpointReader(args.hf_dir), family.hf_format
    names = reader.names()
    expected = layout_of_dir.expected_shapes(family, cfg_dict, names, args.hf_dir)
    check_tensors_match(reader, expected, ignore=layout_of_dir.unused_tensors(cfg_dict, names))
    if args.mcore_dir:
        from megadiff.training.setup import check_weights_fit

        check_weights_fit(args.hf_dir, cfg_dict, args.mcore_dir, args.trust_checkpoint)

    # megatron-core and transformers: after the input checks
    from megadiff.hf.reference import load_reference_model
    from megadiff.models.common.gpt import routed_experts
    from megadiff.models.common.hf_weights import load_hf_into_model
    from megadiff.models.common.logits import full_logits
    from megadiff.platform import init_distributed, initialize_parallel, print_rank0

    owns_group = not torch.distributed.is_initialized()  # a caller's process group stays up
    init_distributed()
    experts = None
    if cfg.num_experts:  # a ConfigError (a UserError) names --moe-experts: one line, exit 2
        experts = routed_experts(cfg, layout, torch.float32, args.moe_experts, key="--moe-experts")
    initialize_parallel(layout)
    print_rank0(
        f"compare_logits: {family.name} model {args.hf_dir} at {layout} ({torch.distributed.get_world_size()} ranks)"
    )
    if experts is not None:
        print_rank0(f"routed experts: {experts.backend} ({experts.reason})")
    rank0 = torch.distributed.get_rank() == 0
    reference = load_reference_model(args.hf_dir) if rank0 else None  # the family's, fp32
    chunks = family.build_model(
        cfg,
        layout,
        attention_backend="flex" if layout.cp > 1 else "dense",
        moe_experts=experts.backend if experts is not None else "auto",
    )
    if args.mcore_dir:
        from megadiff.checkpoint import load_model_weights

        load_model_weights(args.mcore_dir, chunks, iteration=args.iteration, trust=args.trust_checkpoint)
        print_rank0(f"loaded megatron checkpoint {args.mcore_dir}")
    else:
        load_hf_into_model(chunks, layout_of_dir.tensor_getter(reader, args.hf_dir), family.mapping, cfg)

    worst, outputs = 0.0, []
    for i, (ids, pos) in enumerate(zip(ids_rows, pos_rows, strict=True)):
        ids_t, pos_t = torch.tensor([ids]), torch.tensor([pos])
        ours = full_logits(chunks, ids_t, pos_t)  # on every rank
        if not rank0:
            continue
        with torch.no_grad():
            ref = reference(ids_t, position_ids=pos_t).logits.float()
        diff = float((ours - ref).abs().max())
        worst = max(worst, diff)
        outputs.append(ours[0])
        print_rank0(f"row {i}: {len(ids)} tokens, max |Δ| = {diff:.3e}")
    box = [worst]
    torch.distributed.broadcast_object_list(box, src=0)
    worst = box[0]
    ok = worst <= args.tolerance
    if args.save_logits and rank0:
        if len({o.shape[0] for o in outputs}) == 1:
            torch.save(torch.stack(outputs), args.save_logits)
        else:  # ragged rows: a list of [seq, vocab] tensors
            torch.save(outputs, args.save_logits)
        print_rank0(f"logits written to {args.save_logits}")
    print_rank0(f"{'PASS' if ok else 'FAIL'}: max |Δ| = {worst:.3e} (tolerance {args.tolerance:g})")
    torch.distributed.barrier()
    if owns_group:
        torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
