"""Convert a Hugging Face model directory of any megadiff family (LLaDA2 with split- or merged-expert
safetensors, LLaDA, LLaDA-MoE: the family comes from config.json's model_type) into a megadiff
megatron checkpoint (iteration 0) that tools/train.py and tools/compare_logits.py load at any layout.

  megadiff-convert-hf-to-mcore --hf-dir MODEL --output CKPT [--dtype bf16]     (or tools/convert_hf_to_mcore.py)
  torchrun --nproc-per-node 4 tools/convert_hf_to_mcore.py --hf-dir MODEL --output CKPT --tp 2 --ep 2 --pp 2

One process writes the checkpoint at layout (1,1,1) (dist_checkpointing reshards it on load; the
requested layout is still validated and recorded); under torchrun each rank writes its shards of
the requested layout. Tensors are read one at a time, transformed by the family's mapping objects
and written with torch DCP's public writer (--io plain, the default); --io fast copies matrices
kept in their dtype file to file instead (the QKV regroup and gate/up concat done on row
addresses). The model is never materialised.
--spec te writes Transformer Engine names (what a TE model saves), --spec local megatron-core's
local-spec names; the default is what tools/train.py would build on this machine (TE where it is
installed and a GPU is visible, else local). Runs on CPU. The output appears only when complete
(built in CKPT.tmp-<nonce>, then renamed).
"""

import argparse
import glob
import importlib.util
import os
import shlex

from checkpoint_converters.io_paths import IO_CHOICES, IO_HELP
from megadiff.cli.layout_args import add_layout_arguments, layout_from_args

# What CUDA_VISIBLE_DEVICES was before `hide_gpus` (for the --spec default); unset = not hidden yet.
_MACHINE_CUDA_VISIBLE_DEVICES: "str | None" = os.environ.get("CUDA_VISIBLE_DEVICES")


def hide_gpus() -> None:
    """Conversion is data movement: megatron-core stays on its CPU path. Call before torch starts
    CUDA (tools/convert_hf_to_mcore.py does it before importing anything else)."""
    global _MACHINE_CUDA_VISIBLE_DEVICES
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        _MACHINE_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model dir: config.json + safetensors (+ index)")
    p.add_argument("--output", required=True, help="checkpoint root to create (holds iter_0000000/)")
    add_layout_arguments(p)
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="parameter dtype in the checkpoint (default: the HF weights' dtype)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--io", choices=IO_CHOICES, default="plain", help=IO_HELP)
    p.add_argument(
        "--spec",
        choices=["local", "te"],
        default=None,
        help="megatron-core layer spec whose tensor names to write (default: the one training "
        "would use here: te where Transformer Engine is usable, else local)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def training_spec_here() -> str:
    """The spec tools/train.py would build on this machine: te where Transformer Engine is
    installed and the machine shows this process an NVIDIA GPU (before `hide_gpus`), else local.
    Decided from the installed packages and the device nodes, in this process: it imports nothing
    and leaves CUDA untouched (this process hides its GPUs). megadiff loads either spec's names."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "local"
    visible = _MACHINE_CUDA_VISIBLE_DEVICES
    if visible is not None and visible.strip() in ("", "-1"):
        return "local"
    return "te" if glob.glob("/dev/nvidia[0-9]*") else "local"


def main(argv=None) -> int:
    hide_gpus()
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore
    from megadiff.errors import UserError, user_error_exit

    rank0 = os.environ.get("RANK", "0") == "0"
    log = print if rank0 else (lambda *a, **k: None)
    try:
        layout = layout_from_args(args)
        spec = args.spec or training_spec_here()
        log(
            "convert_hf_to_mcore.py "
            + shlex.join(
                [
                    "--hf-dir",
                    os.path.abspath(args.hf_dir),
                    "--output",
                    os.path.abspath(args.output),
                    "--tp",
                    str(layout.tp),
                    "--ep",
                    str(layout.ep),
                    "--etp",
                    str(layout.etp),
                    "--pp",
                    str(layout.pp),
                    *(["--vpp", str(layout.vpp)] if layout.vpp else []),
                    *(["--dtype", args.dtype] if args.dtype else []),
                    *(["--overwrite"] if args.overwrite else []),
                    "--io",
                    args.io,
                    "--spec",
                    spec,
                ]
            )
        )
        final = convert_hf_to_mcore(
            args.hf_dir,
            args.output,
            layout,
            args.dtype,
            args.overwrite,
            progress=rank0 and not args.no_progress,
            log=log,
            io_mode=args.io,
            spec=spec,
        )
    except UserError as e:
        return user_error_exit(e)
    log(f"megatron checkpoint written to {final}")
    return 0
