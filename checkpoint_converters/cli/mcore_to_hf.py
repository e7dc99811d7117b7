"""Export a megadiff megatron checkpoint (converted or trained, any layout, any model family) as a
Hugging Face directory: safetensors shards + index, config.json, generation_config.json, tokenizer and
remote code, loadable with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).

  megadiff-convert-mcore-to-hf --mcore-dir CKPT --output OUT [--iteration N]   (or tools/convert_mcore_to_hf.py)
      [--hf-template DIR] [--merged-experts] [--max-shard-size 5GB]

CKPT is a checkpoint root (latest complete iteration by default) or an iteration dir. Tokenizer,
generation config, chat template and remote code come from --hf-template (default: the HF dir the
checkpoint was made from, recorded in its megadiff.json, if its config.json still matches the
checkpoint's; else megadiff's own remote code, which exists for LLaDA2 only); only those files are
copied, listed at the end.
A checkpoint is read without running code from it: its pickled metadata is checked first
(--trust-checkpoint skips that, for checkpoints you made yourself). Weights keep the
checkpoint's dtype. Needs no torchrun and no megatron-core; tensors are read a few at a time with
torch DCP's load and appended to their shard (--io plain, the default: memory one read group);
--io fast copies tensors stored as whole rows file to file with the byte-copy engine instead.
The output appears only when complete (built in OUT.tmp-<nonce>, then renamed).

A LoRA run's adapter-only checkpoint (it records its base, an HF dir or a megatron checkpoint):
--output OUT writes the merged model, W + alpha/r * B A, as a normal HF dir; --peft-adapter DIR
writes a Hugging Face PEFT adapter instead (adapter_config.json + adapter_model.safetensors, HF
module names), for `peft.PeftModel.from_pretrained` on the base model in HF form. --base-dir DIR
names the base when it moved (its fingerprint must match the recorded one).
"""

import argparse
import os
import shlex

from checkpoint_converters.io_paths import IO_CHOICES, IO_HELP  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="checkpoint root or iter_XXXXXXX dir")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest complete)")
    p.add_argument("--output", default=None, help="HF directory to create (required unless --peft-adapter)")
    p.add_argument("--peft-adapter", default=None, help="LoRA checkpoint: write a PEFT adapter dir here instead")
    p.add_argument("--base-dir", default=None, help="LoRA checkpoint: its base's new place, if it moved")
    p.add_argument("--hf-template", default=None, help="dir to take tokenizer / remote code / generation config from")
    p.add_argument("--merged-experts", action="store_true", help="write dFactory's merged-expert layout")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--io", choices=IO_CHOICES, default="plain", help=IO_HELP)
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint's metadata without restriction (only for checkpoints you made: "
        "a pickle can run code)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    from checkpoint_converters.lora_export import export_lora_checkpoint
    from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
    from megadiff.checkpoint.format import resolve_checkpoint_dir
    from megadiff.errors import UserError, user_error_exit
    from megadiff.lora.adapter_checkpoint import is_lora_checkpoint

    print(
        "convert_mcore_to_hf.py "
        + shlex.join(
            [
                "--mcore-dir",
                os.path.abspath(args.mcore_dir),
                *(["--output", os.path.abspath(args.output)] if args.output else []),
                *(["--peft-adapter", os.path.abspath(args.peft_adapter)] if args.peft_adapter else []),
                *(["--base-dir", os.path.abspath(args.base_dir)] if args.base_dir else []),
                *(["--iteration", str(args.iteration)] if args.iteration is not None else []),
                *(["--hf-template", os.path.abspath(args.hf_template)] if args.hf_template else []),
                *(["--merged-experts"] if args.merged_experts else []),
                "--max-shard-size",
                args.max_shard_size,
                *(["--overwrite"] if args.overwrite else []),
                "--io",
                args.io,
                *(["--trust-checkpoint"] if args.trust_checkpoint else []),
            ]
        ),
        flush=True,
    )
    try:
        if args.output is None and args.peft_adapter is None:
            raise UserError("--output OUT is required (or --peft-adapter DIR for a LoRA checkpoint)")
        if is_lora_checkpoint(resolve_checkpoint_dir(args.mcore_dir, args.iteration)):
            out = export_lora_checkpoint(
                args.mcore_dir,
                None if args.peft_adapter else args.output,
                peft_adapter=args.peft_adapter,
                iteration=args.iteration,
                base_dir=args.base_dir,
                merged_experts=args.merged_experts,
                trust_checkpoint=args.trust_checkpoint,
                hf_template=args.hf_template,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                io_mode=args.io,
            )
            print(f"{'PEFT adapter' if args.peft_adapter else 'merged HF model'} written to {out}")
            return 0
        if args.peft_adapter or args.base_dir:
            flag = "--peft-adapter" if args.peft_adapter else "--base-dir"
            raise UserError(f"{args.mcore_dir}: {flag} is for LoRA (adapter-only) checkpoints; this one is a full one")
        out = convert_mcore_to_hf(
            args.mcore_dir,
            args.output,
            args.iteration,
            args.hf_template,
            args.merged_experts,
            args.max_shard_size,
            args.overwrite,
            progress=not args.no_progress,
            io_mode=args.io,
            trust_checkpoint=args.trust_checkpoint,
        )
    except UserError as e:
        return user_error_exit(e)
    except ValueError as e:  # --max-shard-size
        return user_error_exit(e)
    print(f"HF model written to {out}")
    return 0
