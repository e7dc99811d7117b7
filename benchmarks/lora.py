"""LoRA vs full fine-tuning: trainable parameters, gradient and optimizer memory, step time.

1. At LLaDA2-mini shape (pure arithmetic, megadiff.planner): trainable parameters of the whole model,
   and per GPU the gradient and optimizer bytes megatron-core allocates, computed from the shards
   of the fullest rank (the planner reproduces megatron-core DDP's buffers and the distributed
   optimizer's shard exactly; tests/dist/test_planner.py checks it against allocated buffers), for
   one GPU and for the example config's node (EP=8, 8 GPUs), LoRA with and without routed experts.
2. Step time on the CPU tiny model: full fine-tuning and LoRA trainers built in the same process,
   one after the other, median of timed steps after warm-up (the ratio is what counts: the CPU
   and its neighbours are the same for both).

    .venv/bin/python benchmarks/lora.py [--rank 16] [--steps 20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.planner import RunShape, rank_parameters, state_bytes  # noqa: E402

GiB = 1024**3


def trainable_params(model, rank: int | None, experts: bool) -> int:
    return sum(
        p.numel for p in rank_parameters(model, ParallelLayout(), 0, 0, rank, lora_experts=experts) if p.trainable
    )


def shard_memory(model, layout: ParallelLayout, world: int, rank: int | None, experts: bool) -> dict:
    """Gradient and optimizer bytes on the fullest GPU (pipeline rank 0, data-parallel rank 0)."""
    shape = RunShape(seq_len=4096, global_batch_size=64, dtype="bf16", lora_rank=rank, lora_experts=experts)
    split = state_bytes(model, layout, world, shape, pp_rank=0)
    return {"weights": split.weights, "grads": split.grads, "optimizer": split.optimizer}


def planner_table(rank: int) -> list[dict]:
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"), "preset llada2-mini")
    layouts = [("1 GPU (tp1 ep1 pp1)", ParallelLayout(), 1), ("8 GPUs (tp1 ep8 pp1)", ParallelLayout(ep=8), 8)]
    full_params = trainable_params(model, None, False)
    rows = []
    for name, layout, world in layouts:
        full = shard_memory(model, layout, world, None, False)
        for experts in (False, True):
            lora = shard_memory(model, layout, world, rank, experts)
            params = trainable_params(model, rank, experts)
            rows.append(
                {
                    "layout": name,
                    "lora": f"r={rank}" + (", + routed experts" if experts else ", dense + shared expert"),
                    "trainable_params": params,
                    "full_trainable_params": full_params,
                    "params_ratio": params / full_params,
                    "grads_gib": lora["grads"] / GiB,
                    "full_grads_gib": full["grads"] / GiB,
                    "grads_ratio": lora["grads"] / full["grads"],
                    "optimizer_gib": lora["optimizer"] / GiB,
                    "full_optimizer_gib": full["optimizer"] / GiB,
                    "optimizer_ratio": lora["optimizer"] / full["optimizer"],
                }
            )
    return rows


def step_times(rank: int, steps: int, warmup: int = 3) -> dict:
    """Median seconds per train_step of a full and a LoRA trainer on the tiny model (1 process)."""
    os.environ.setdefault("MEGADIFF_DEVICE", "cpu")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29613"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import torch

    from megadiff.data.synthetic import arithmetic_problems, as_messages
    from megadiff.hf.tiny import write_tiny_model_dir
    from megadiff.training.config import load_config
    from megadiff.training.loop import Trainer

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_tiny_model_dir(os.path.join(tmp, "hf"), seed=0)
        data = os.path.join(tmp, "train.jsonl")
        with open(data, "w") as f:
            for row in arithmetic_problems(256, seed=1):
                f.write(json.dumps(as_messages(row)) + "\n")
        common = [
            f"model.hf_dir={hf}",
            f"data.train_files={data}",
            "data.max_seq_len=128",
            "train.global_batch_size=4",
            f"train.steps={steps + warmup}",
            "diffusion.block_size=8",
            "logging.progress_bar=false",
        ]
        for name, extra in (("full", []), ("lora", ["lora.enabled=true", f"lora.rank={rank}"])):
            trainer = Trainer(load_config(None, common + extra))
            times = []
            for i in range(steps + warmup):
                start = time.perf_counter()
                trainer.train_step()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
            trainer.close()
    out["ratio"] = out["lora"] / out["full"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per trainer (default: %(default)s)")
    p.add_argument("--skip-step-time", action="store_true", help="only the planner's numbers")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args(argv)
    rows = planner_table(args.rank)
    print(
        "| layout | LoRA | trainable params (LoRA / full) | grads GiB per GPU (LoRA / full) | "
        "optimizer GiB per GPU (LoRA / full) |"
    )
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['lora']} | {r['trainable_params'] / 1e6:,.1f}M / {r['full_trainable_params'] / 1e9:.2f}B"
            f" = {r['params_ratio']:.2e} | {r['grads_gib']:.3f} / {r['full_grads_gib']:.1f} = {r['grads_ratio']:.2e}"
            f" | {r['optimizer_gib']:.3f} / {r['full_optimizer_gib']:.1f} = {r['optimizer_ratio']:.2e} |"
        )
    result = {"planner": rows}
    if not args.skip_step_time:
        times = step_times(args.rank, args.steps)
        result["step_time"] = times
        print(
            f"\nstep time, CPU tiny model (1 process, {args.steps} steps after warm-up, median): full "
            f"{times['full'] * 1e3:.1f} ms, LoRA r={args.rank} {times['lora'] * 1e3:.1f} ms, LoRA / full = "
            f"{times['ratio']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
