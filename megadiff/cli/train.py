"""Diffusion SFT of a dLLM on megatron-core: any model family (LLaDA2, LLaDA, LLaDA-MoE; config.json's
model_type says which, and the family's recipe fills the diffusion keys the config leaves unset).
Run under torchrun (see examples/pretrain_llada2_sft.sh):

  torchrun --nproc-per-node 2 tools/train.py examples/configs/tiny_bd_sft.yaml parallel.tp=2 train.lr=2e-5

Overrides are section.key=value (sections: model, data, train, parallel, diffusion, dpo, checkpoint,
logging, perf, lora); `--help-config` lists every key with its type, default and meaning.
Megatron-LM flags are read as the key they mean, with a note (`--tensor-model-parallel-size 2` is
parallel.tp=2, `--micro-batch-size 4` train.micro_batch_size=4), or refused naming what to use.
A SIGTERM saves a checkpoint and exits 0. An error in the input (config, data rows, the model's
config.json, tokenizer, checkpoint) is printed as one line naming the culprit, and the exit status is 2.
"""

import argparse
import os
import sys


def main(argv=None):
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    from megadiff.platform.rank_output import warnings_from_rank0_only

    warnings_from_rank0_only()  # before megatron-core, torch.distributed or transformers warn
    from megadiff.errors import UserError, note_error_line, user_error_exit
    from megadiff.training.megatron_flags import overrides_from_megatron_flags

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its type and default")
    try:  # Megatron-LM habits (--tensor-model-parallel-size 2) become overrides, with a note each
        argv, flag_overrides, notes = overrides_from_megatron_flags(sys.argv[1:] if argv is None else list(argv))
    except UserError as e:
        return user_error_exit(e)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(note, flush=True)
    args = parser.parse_args(argv)
    args.overrides += flag_overrides

    from megadiff.training.config import describe_config, load_config

    if args.help_config:
        print(describe_config())
        return 0
    if args.config is None:
        parser.error("the YAML config is required (see --help-config for its keys)")
    try:
        cfg = load_config(args.config, args.overrides)
        # after the config is read: a config error is one line, before megatron-core's import warnings
        from megadiff.training.loop import train

        results = train(cfg)
    except UserError as e:
        return user_error_exit(e)
    except Exception as e:  # a bug or a crash keeps its traceback; the launcher repeats its last line
        note_error_line(f"error (rank {os.environ.get('RANK', '0')}): {type(e).__name__}: {e}")
        raise
    import torch

    from megadiff.platform import print_rank0

    if results:
        print_rank0(
            f"done: {len(results)} steps, final loss {results[-1].loss:.4f}"
            + (f", checkpoints in {cfg.checkpoint.save_dir}" if cfg.checkpoint.save_dir else "")
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
