"""torchrun worker: tools/compare_logits.py's main() run several times in one launch, one model
and layout per run (--runs: a JSON list of the tool's command lines, as strings), so one process
group serves every family. Rank 0 writes {command line: exit code} to --out; the tool's output
goes to the log."""

import argparse
import json
import os
import shlex
import sys

# the repo root: the worker imports the tool (tools.*) and runs with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.platform import init_distributed  # noqa: E402
from tools import compare_logits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="JSON file: a list of compare_logits command lines")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed()  # the tool keeps a process group it did not create
    codes = {}
    with open(args.runs) as f:
        runs = json.load(f)
    for run in runs:
        codes[run] = compare_logits.main(shlex.split(run))
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(codes, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
