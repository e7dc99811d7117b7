"""torchrun worker: HF -> megatron -> HF through the converter entry points, for model families.

For each `--job NAME=HF_DIR@tp,ep,pp[@io]`: every rank runs `megadiff-convert-hf-to-mcore`'s main
(tools/convert_hf_to_mcore.py) at that layout (each rank writes its shards); rank 0 then runs
`megadiff-convert-mcore-to-hf`'s main through the plain and the fast (byte-copy) path, and compares
every tensor of each output with the input dir's, bit for bit (names, dtypes, values). Then the
converted checkpoint is loaded at its layout with megatron-core's dist_checkpointing and its logits
compared with the family's plain reference holding the input dir's weights.
Rank 0 writes {NAME: {"not_exact_plain": n, "not_exact_fast": n, "logits": max |diff|}} to --out.
"""

import argparse
import json
import os

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megadiff.platform.parallel_layout import ParallelLayout  # noqa: E402


def hf_tensors(hf_dir: str) -> dict:
    from megadiff.hf.checkpoint_reader import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    return {name: reader.get(name) for name in reader.names()}


def not_exact(a: dict, b: dict) -> int:
    """How many tensors differ (name missing, dtype, shape or any bit)."""
    bad = len(set(a) ^ set(b))
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            bad += 1
    return bad


def logits_error(hf_dir: str, ckpt_root: str, layout: ParallelLayout) -> float:
    """Max |logits - reference| of the converted checkpoint loaded at `layout` (fp32, one row)."""
    from megatron.core import dist_checkpointing

    from megadiff.checkpoint.dist import model_sharded_state_dict, model_state_keys, unwrap_model
    from megadiff.checkpoint.format import resolve_checkpoint_dir
    from megadiff.hf.checkpoint_reader import read_hf_config
    from megadiff.models.common.schedule import forward_backward
    from megadiff.models.registry import family_for_config
    from megadiff.platform import initialize_parallel

    config = read_hf_config(hf_dir)
    fam = family_for_config(config)
    cfg = fam.config_from_hf(config)
    ref = fam.build_reference(config, seed=1)
    ref.load_state_dict(hf_tensors(hf_dir))
    initialize_parallel(layout)
    chunks = fam.build_model(cfg, layout)
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), resolve_checkpoint_dir(ckpt_root))
    for key, chunk in zip(model_state_keys(len(chunks)), chunks, strict=True):
        unwrap_model(chunk).load_state_dict(state[key])
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        expected = ref(ids, pos, None).logits[0]

    def loss_fn(batch, output):
        diff = (gather_from_tensor_model_parallel_region(output)[0] - expected).abs().max()
        return output.sum() * 0.0, torch.tensor(1), {"logit_diff": diff}

    for c in chunks:
        c.eval()
    with torch.no_grad():
        out = forward_backward(chunks, [dict(input_ids=ids, position_ids=pos, allowed=None)], loss_fn, True)
    return max([float(o["logit_diff"]) for o in out], default=0.0)


def main():
    from tools import convert_hf_to_mcore, convert_mcore_to_hf

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", action="append", required=True, help="NAME=HF_DIR@tp,ep,pp[@io]")
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for job in args.job:
        name, rest = job.split("=", 1)
        hf_dir, layout_text, *io = rest.split("@")
        tp, ep, pp = (int(x) for x in layout_text.split(","))
        ckpt = os.path.join(args.work, f"{name}-mcore")
        argv = ["--hf-dir", hf_dir, "--output", ckpt, "--tp", str(tp), "--ep", str(ep), "--pp", str(pp)]
        assert convert_hf_to_mcore.main(argv + ["--no-progress", "--io", io[0] if io else "auto"]) == 0
        rank = torch.distributed.get_rank()
        result = {}
        if rank == 0:
            original = hf_tensors(hf_dir)
            for io_mode in ("plain", "fast"):
                out = os.path.join(args.work, f"{name}-hf-{io_mode}")
                argv = ["--mcore-dir", ckpt, "--output", out, "--no-progress", "--io", io_mode]
                assert convert_mcore_to_hf.main(argv) == 0
                result[f"not_exact_{io_mode}"] = not_exact(original, hf_tensors(out))
        torch.distributed.barrier()
        result["logits"] = logits_error(hf_dir, ckpt, ParallelLayout(tp=tp, ep=ep, pp=pp))
        t = torch.tensor(result["logits"])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        result["logits"] = float(t)
        if rank == 0:
            results[name] = result
            print(name, layout_text, result, flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
