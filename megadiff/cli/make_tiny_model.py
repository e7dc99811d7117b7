"""Write a tiny random-init HF directory of a model family — the layout of a real download.

llada2 (default): tokenizer with LLaDA2's special tokens and chat template, config.json with
auto_map, remote code, safetensors. llada / lladamoe: the family's tiny preset (config.json,
model.safetensors under the released names) and a tokenizer with the family's special tokens
(mask, EOS, end of turn) and chat template.

  .venv/bin/python tools/make_tiny_model.py --output demo_out/tiny_hf
  .venv/bin/python tools/make_tiny_model.py --family llada --output demo_out/tiny_llada
"""

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--family", default="llada2", help="model family: llada2 (default), llada, lladamoe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="llada2 only: transformer layers (default: the tiny preset's 4); at least 2: the dense first layer "
        "and one MoE layer",
    )
    args = p.parse_args(argv)
    from megadiff.errors import ConfigError
    from megadiff.models.registry import family as family_named

    try:
        family_named(args.family)
    except ConfigError as e:
        from megadiff.errors import user_error_exit

        return user_error_exit(f"--family {args.family}: {e}")
    if args.layers is not None and args.family != "llada2":
        from megadiff.errors import user_error_exit

        return user_error_exit(
            f"--layers: applies to --family llada2 only (the {args.family} tiny preset has 4 layers)"
        )
    if args.layers is not None and args.layers < 2:
        from megadiff.errors import user_error_exit

        return user_error_exit(f"--layers {args.layers}: needs at least 2 (the dense first layer and one MoE layer)")
    if os.path.exists(os.path.join(args.output, "config.json")) and not args.overwrite:
        from megadiff.errors import user_error_exit

        return user_error_exit(f"{args.output} already holds a model; pass --overwrite to replace it")
    from megadiff.hf.tiny import write_tiny_model_dir

    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
    write_tiny_model_dir(args.output, seed=args.seed, family=args.family, **overrides)
    name = "LLaDA2" if args.family == "llada2" else args.family
    print(f"tiny {name} model written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
