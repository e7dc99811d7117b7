#!/usr/bin/env python3
"""Write a tiny random-init LLaDA2 HF directory (tokenizer with LLaDA2's special tokens and chat
template, config.json with auto_map, remote code, safetensors) — the layout of a real download.

  .venv/bin/python tools/make_tiny_model.py --output demo_out/tiny_hf
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer layers (default: the tiny preset's 4); at least 2: the dense first layer and one MoE layer",
    )
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 2:
        from megadiff.errors import user_error_exit

        return user_error_exit(f"--layers {args.layers}: needs at least 2 (the dense first layer and one MoE layer)")
    if os.path.exists(os.path.join(args.output, "config.json")) and not args.overwrite:
        from megadiff.errors import user_error_exit

        return user_error_exit(f"{args.output} already holds a model; pass --overwrite to replace it")
    from megadiff.hf.tiny import write_tiny_model_dir

    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    write_tiny_model_dir(args.output, seed=args.seed, **overrides)
    print(f"tiny LLaDA2 model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
