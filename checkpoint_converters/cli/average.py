"""Average the model weights of checkpoints of one run into a new megatron checkpoint (the LLaDA2.0
report's merge of the k best checkpoints by validation loss).

  .venv/bin/python tools/average_checkpoints.py --mcore-dir RUN_DIR --top-k 2 --output AVG_DIR
  .venv/bin/python tools/average_checkpoints.py --mcore-dir RUN_DIR --iterations 400 500 --output AVG_DIR

--top-k K ranks the run's complete iterations by the valid_loss each megadiff.json records (training
writes it when train.eval_interval is set); a valid_loss is measured at its phase's block size, so with
a block schedule rank one phase's checkpoints: --phase bd32. Checkpoints of different model configs or megatron-core
specs are refused, naming both. Each tensor is averaged in fp32, one tensor at a time; the output
holds weights only (no optimizer state): start a run from it with model.init_from_mcore=AVG_DIR, or
export it with tools/convert_mcore_to_hf.py --mcore-dir AVG_DIR --output HF_DIR. It appears only
when complete. A checkpoint's pickled metadata is checked before it is read (--trust-checkpoint skips
that, for checkpoints you made yourself).
"""

import argparse
import os
import shlex


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="the run's checkpoint root (checkpoint.save_dir)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--iterations", type=int, nargs="+", help="iterations to average")
    which.add_argument("--top-k", type=int, help="average the K iterations with the lowest recorded valid_loss")
    p.add_argument("--phase", help="--top-k among the iterations saved in this block-schedule phase (e.g. bd32)")
    p.add_argument("--output", required=True, help="checkpoint root to create (iteration 0, weights only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle metadata without the allow-list")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the writer runs on the CPU, in one process
    from checkpoint_converters.average import average_checkpoints
    from megadiff.errors import UserError, user_error_exit

    which = ["--iterations", *map(str, args.iterations)] if args.iterations else ["--top-k", str(args.top_k)]
    which += ["--phase", args.phase] if args.phase else []
    command = ["--mcore-dir", os.path.abspath(args.mcore_dir), *which, "--output", os.path.abspath(args.output)]
    command += (["--overwrite"] if args.overwrite else []) + (["--trust-checkpoint"] if args.trust_checkpoint else [])
    print("average_checkpoints.py " + shlex.join(command), flush=True)
    try:
        out = average_checkpoints(
            args.mcore_dir,
            args.output,
            iterations=args.iterations,
            top_k=args.top_k,
            phase=args.phase,
            overwrite=args.overwrite,
            trust_checkpoint=args.trust_checkpoint,
            progress=not args.no_progress,
        )
    except UserError as e:
        return user_error_exit(e)
    print(f"averaged checkpoint written to {out} (start a run from it: model.init_from_mcore={args.output})")
    return 0
