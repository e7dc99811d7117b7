"""torchrun worker for the converter tests: conversions at a layout and cross-layout loading, in one launch.

1. HF -> megatron at the launch's layout (each rank writes its shards) for every `--convert SRC=DST`.
2. For every `--load CKPT@tp,ep,pp[,vpp]`: build the model at that layout, `load_model_weights`,
   and compare full logits of a few rows with the HF reference (`--reference`).
Rank 0 writes {"CKPT@layout": max |logit diff|} as JSON to --out.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
warnings.simplefilter("ignore")

import torch  # noqa: E402


def parse_layout(text):
    from megadiff.models.llada2 import ParallelLayout

    tp, ep, pp, *vpp = (int(x) for x in text.split(","))
    return ParallelLayout(tp=tp, ep=ep, pp=pp, vpp=vpp[0] if vpp else None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layout", required=True, help="tp,ep,pp[,vpp] for the conversions")
    p.add_argument("--convert", action="append", default=[], help="HF_DIR=OUTPUT")
    p.add_argument("--load", action="append", default=[], help="CKPT@tp,ep,pp[,vpp]")
    p.add_argument("--reference", required=True, help="HF dir whose logits the loaded models must give")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from checkpoint_converters.hf_io import read_hf_config
    from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore
    from megadiff.checkpoint import load_model_weights
    from megadiff.hf.reference import load_reference_model
    from megadiff.models.llada2 import LLaDA2ModelConfig
    from megadiff.models.llada2.logits import full_logits
    from megadiff.models.llada2.model import build_model
    from megadiff.platform import init_distributed, initialize_parallel

    quiet = lambda *a, **k: None  # noqa: E731
    for item in args.convert:
        src, dst = item.split("=")
        convert_hf_to_mcore(src, dst, parse_layout(args.layout), progress=False, log=quiet)

    init_distributed()
    reference = load_reference_model(args.reference)
    cfg = LLaDA2ModelConfig.from_hf_dict(read_hf_config(args.reference))
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (16, 11)]
    with torch.no_grad():
        expected = [reference(ids, torch.arange(ids.shape[1])[None]).logits.float() for ids in rows]
    results = {}
    for item in args.load:
        ckpt, layout_text = item.split("@")
        layout = parse_layout(layout_text)
        initialize_parallel(layout)
        chunks = build_model(cfg, layout)
        meta = load_model_weights(ckpt, chunks)
        worst = 0.0
        for ids, want in zip(rows, expected):
            got = full_logits(chunks, ids, torch.arange(ids.shape[1])[None])
            worst = max(worst, float((got - want).abs().max()))
        results[f"{os.path.basename(ckpt)}@{layout}"] = {"logits": worst, "saved_layout": meta["layout"]}
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
