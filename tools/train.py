#!/usr/bin/env python3
"""Diffusion SFT of a LLaDA2 model on megatron-core. Run under torchrun (see
examples/pretrain_llada2_sft.sh):

  torchrun --nproc-per-node 2 tools/train.py examples/configs/tiny_bd_sft.yaml parallel.tp=2 train.lr=2e-5

Overrides are section.key=value (sections: model, data, train, parallel, diffusion, checkpoint,
logging). A SIGTERM saves a checkpoint and exits 0.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    from megadiff.training.config import TrainingConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except TrainingConfigError as e:
        raise SystemExit(f"error: {e}")
    from megadiff.platform import print_rank0
    from megadiff.training.loop import train

    results = train(cfg)
    import torch

    if results:
        print_rank0(f"done: {len(results)} steps, final loss {results[-1].loss:.4f}"
                    + (f", checkpoints in {cfg.checkpoint.save_dir}" if cfg.checkpoint.save_dir else ""))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
