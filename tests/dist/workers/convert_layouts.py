"""torchrun worker for the converter tests: conversions at a layout and cross-layout loading, in one launch.

1. HF -> megatron at the launch's layout (each rank writes its shards) for every `--convert SRC=DST`,
   through the byte-copy engine (io fast) into DST and through the plain path into DST-plain.
2. With `--save ROOT=CKPT`: a training-like checkpoint (model + optimizer-like + common state) saved
   with `save_checkpoint` at the launch's layout, then read back with `load_checkpoint`.
3. For every `--load CKPT@tp,ep,pp[,vpp]`: build the model at that layout, `load_model_weights`,
   and compare the weights (gathered back to HF names) and the full logits of a few rows (not with
   VPP: one row is one micro-batch) with the HF reference (`--reference`).
4. With `--te-request CKPT@layout`: what a Transformer Engine model asks a local-spec checkpoint for
   (the local model's sharded state dict renamed to TE keys through the table, plus TE-style
   `_extra_state` objects), through `load_checkpoint`; compared with a plain local load.
Rank 0 writes {"CKPT@layout": {"weights": max |diff|, "logits": max |diff|, ...}} to --out.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the converters run on CPU (gloo), as their CLIs do
warnings.simplefilter("ignore")

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402


def parse_layout(text):
    from megadiff.models.llada2 import ParallelLayout

    tp, ep, pp, *vpp = (int(x) for x in text.split(","))
    return ParallelLayout(tp=tp, ep=ep, pp=pp, vpp=vpp[0] if vpp else None)


def save_training_like_checkpoint(args, cfg, hf_config):
    """What a trainer writes: model + (here: fake) optimizer state + common state, iteration 7.
    Then `load_checkpoint` of only the extra state, which must not need the model keys."""
    from megatron.core.dist_checkpointing import ShardedTensor

    from megadiff.checkpoint import load_checkpoint, load_model_weights, model_sharded_state_dict, save_checkpoint
    from megadiff.models.llada2.model import build_model
    from megadiff.platform import initialize_parallel

    root, ckpt = args.save.split("=")
    layout = parse_layout(args.layout)
    initialize_parallel(layout)
    chunks = build_model(cfg, layout)
    load_model_weights(ckpt, chunks)
    rank = torch.distributed.get_rank()

    def fake(data):
        return {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.fake.exp_avg", data, replica_id=rank)}

    state = model_sharded_state_dict(chunks)
    state["optimizer"] = fake(torch.full((4,), 7.0))
    state["scheduler"] = {"lr": 0.5}
    meta = {
        "hf_config": hf_config,
        "hf_source_dir": args.reference,
        "layout": vars(layout),
        "dtype": "float32",
        "extra": {"step": 7},
    }
    path = save_checkpoint(root, 7, state, meta)
    loaded, loaded_meta = load_checkpoint(root, {"optimizer": fake(torch.zeros(4))})
    return {
        "path": path,
        "exp_avg": loaded["optimizer"]["exp_avg"].tolist(),
        "scheduler": loaded["scheduler"],
        "iteration": loaded_meta["iteration"],
        "extra": loaded_meta["extra"],
    }


def te_request_check(item, cfg, hf_config):
    """Load a local-spec checkpoint with a TE-named request: every tensor equals a local load's,
    and each `_extra_state` the checkpoint lacks comes back as the model's own value."""
    from megatron.core.dist_checkpointing import ShardedObject

    from megadiff.checkpoint import load_checkpoint, model_sharded_state_dict
    from megadiff.checkpoint.dist import rename_sharded_keys
    from megadiff.models.llada2.checkpoint_keys import other_spec_keys
    from megadiff.models.llada2.model import build_model
    from megadiff.platform import initialize_parallel

    ckpt, layout_text = item.split("@")
    layout = parse_layout(layout_text)
    initialize_parallel(layout)
    chunks = build_model(cfg, layout)
    plain, _ = load_checkpoint(ckpt, model_sharded_state_dict(chunks))
    request = model_sharded_state_dict(chunks)
    renamed = rename_sharded_keys(request, other_spec_keys(hf_config))
    own = {}  # megatron-core's local linears save an `_extra_state` (None) too; TE's core attention adds one
    for name in list(request["model"]):
        if name.endswith("linear_qkv.weight"):
            extra = name.replace("linear_qkv.weight", "core_attention._extra_state")
            own[extra] = f"own extra state of {extra}"
            key = request["model"][name].key.replace("linear_qkv.weight", "core_attention._extra_state")
            request["model"][extra] = ShardedObject(
                key, own[extra], (1,), (0,), replica_id=torch.distributed.get_rank()
            )
    loaded, _ = load_checkpoint(ckpt, request)
    return {
        "renamed": renamed,
        "max_diff": max(
            float((loaded["model"][n] - t).abs().max()) for n, t in plain["model"].items() if torch.is_tensor(t)
        ),
        "same_keys": sorted(set(loaded["model"]) - set(own)) == sorted(plain["model"]),
        "extra_state_kept": bool(own) and all(loaded["model"][n] == v for n, v in own.items()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layout", required=True, help="tp,ep,pp[,vpp] for the conversions")
    p.add_argument("--convert", action="append", default=[], help="HF_DIR=OUTPUT")
    p.add_argument("--load", action="append", default=[], help="CKPT@tp,ep,pp[,vpp]")
    p.add_argument("--save", default=None, help="ROOT=CKPT: load CKPT at --layout, save it to ROOT with extra state")
    p.add_argument("--te-request", action="append", default=[], help="CKPT@tp,ep,pp (a local-spec checkpoint)")
    p.add_argument("--reference", required=True, help="HF dir whose logits the loaded models must give")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore
    from megadiff.checkpoint import load_model_weights
    from megadiff.hf.checkpoint_reader import read_hf_config
    from megadiff.hf.reference import load_reference_model
    from megadiff.models.common.logits import full_logits
    from megadiff.models.llada2 import LLaDA2ModelConfig
    from megadiff.models.llada2.hf_mapping import gather_hf_state
    from megadiff.models.llada2.model import build_model
    from megadiff.platform import init_distributed, initialize_parallel

    quiet = lambda *a, **k: None  # noqa: E731
    for item in args.convert:
        src, dst = item.split("=")
        convert_hf_to_mcore(src, dst, parse_layout(args.layout), progress=False, log=quiet, io_mode="fast")
        convert_hf_to_mcore(src, dst + "-plain", parse_layout(args.layout), progress=False, log=quiet, io_mode="plain")

    init_distributed()
    hf_config = read_hf_config(args.reference)
    cfg = LLaDA2ModelConfig.from_hf_dict(hf_config)
    results = {}
    if args.save:
        results["save"] = save_training_like_checkpoint(args, cfg, hf_config)
    for item in args.te_request:
        results[f"te_request:{os.path.basename(item.split('@')[0])}"] = te_request_check(item, cfg, hf_config)
    reference = load_reference_model(args.reference)
    reference_state = {n: t for n, t in reference.state_dict().items() if not n.endswith("inv_freq")}
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (16, 11)]
    with torch.no_grad():
        expected = [reference(ids, torch.arange(ids.shape[1])[None]).logits.float() for ids in rows]
    for item in args.load:
        ckpt, layout_text = item.split("@")
        layout = parse_layout(layout_text)
        initialize_parallel(layout)
        chunks = build_model(cfg, layout)
        meta = load_model_weights(ckpt, chunks)
        weights = gather_hf_state(chunks, cfg)
        result = {
            "saved_layout": meta["layout"],
            "weights": max(
                float((weights[name] - tensor.float()).abs().max()) for name, tensor in reference_state.items()
            ),
        }
        if not layout.vpp:  # the interleaved schedule needs >= pp micro-batches; one row is one
            result["logits"] = max(
                float((full_logits(chunks, ids, torch.arange(ids.shape[1])[None]) - want).abs().max())
                for ids, want in zip(rows, expected, strict=True)
            )
        results[f"{os.path.basename(ckpt)}@{layout}"] = result
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
