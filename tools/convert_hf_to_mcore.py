#!/usr/bin/env python3
"""Hugging Face dir of any family -> megadiff megatron checkpoint: the `megadiff-convert-hf-to-mcore` console script (setup.py).
Command line and help: checkpoint_converters.cli.hf_to_mcore (`--help`)."""

import sys

from checkpoint_converters.cli import hf_to_mcore as cli

cli.hide_gpus()  # before anything starts torch: conversion runs on the CPU

parse_args = cli.parse_args


def main(argv=None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    rc = main()
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(rc)
