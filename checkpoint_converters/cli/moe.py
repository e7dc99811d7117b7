"""Merge or split the routed experts of an HF LLaDA2 checkpoint (dFactory-compatible names/shapes).

  .venv/bin/python tools/moe_convertor.py --input-path HF_SPLIT --output-path HF_MERGED --mode merge
  .venv/bin/python tools/moe_convertor.py --input-path HF_MERGED --output-path HF_SPLIT --mode split

merge: model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight -> model.layers.i.mlp.experts.{gate,up,down}_proj
([E, Fm, H] / [E, H, Fm]); split: the reverse. Other tensors and files (config, tokenizer, remote
code) are copied unchanged. --io fast copies every tensor file to file in the kernel (nothing is read
into memory); the output appears only when complete (built in OUT.tmp-<nonce>, then renamed).
"""

import argparse
import os
import shlex


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-path", required=True, help="HF LLaDA2 dir to read")
    p.add_argument("--output-path", required=True, help="HF dir to create")
    p.add_argument("--mode", required=True, choices=["merge", "split"])
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-path")
    p.add_argument(
        "--io",
        choices=["plain", "fast", "direct", "page-cache"],
        default="plain",
        help="how weight bytes are moved: plain (default) = tensors read with safe_open and written "
        "with ordinary writes; fast = direct = the byte-copy engine with O_DIRECT reads and writes, "
        "bypassing the page cache (falls back per file where refused); page-cache = the engine with "
        "copy_file_range",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    from checkpoint_converters.moe import convert_expert_layout
    from megadiff.errors import user_error_exit

    print(
        "moe_convertor.py "
        + shlex.join(
            [
                "--input-path",
                os.path.abspath(args.input_path),
                "--output-path",
                os.path.abspath(args.output_path),
                "--mode",
                args.mode,
                "--max-shard-size",
                args.max_shard_size,
                *(["--overwrite"] if args.overwrite else []),
                "--io",
                args.io,
            ]
        ),
        flush=True,
    )
    try:
        out = convert_expert_layout(
            args.input_path,
            args.output_path,
            args.mode,
            args.max_shard_size,
            args.overwrite,
            progress=not args.no_progress,
            io_mode=args.io,
        )
    except ValueError as e:  # every UserError, and a bad --max-shard-size
        return user_error_exit(e)
    done = "merged" if args.mode == "merge" else "split"
    print(f"{done} checkpoint written to {out}")
    return 0
