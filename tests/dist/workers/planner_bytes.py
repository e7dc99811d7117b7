"""torchrun worker: bytes of the weights, gradients and optimizer state megadiff actually builds on
every rank, next to megadiff.planner's forecast for that rank, at several layouts in one launch.

For each layout, dtype (fp32, bf16) and optimizer (distributed or not): build the tiny model,
wrap it in megatron-core DDP, build the optimizer and take one step (Adam state is created
lazily), then count
- weights: unique storages of the model's parameters (the DDP param buffer with the distributed
  optimizer), gradients: unique storages of their main_grad (the fp32 grad buffers);
- optimizer: exp_avg / exp_avg_sq of every Adam state and the fp32 master copies, per
  sub-optimizer (dense / expert-parallel).
With --lora, each layout adds one LoRA case (bf16, distributed optimizer, rank 4 on every target
and the routed experts): the frozen base has weights only, the adapters gradients and Adam state.
Writes {rank: {case: {"actual": {...}, "forecast": {...}}}} (every rank's file merged by rank 0).
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch
from megatron.core import parallel_state as ps

from megadiff.lora.apply import TARGET_MODULES, apply_lora
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.planner import RunShape, state_bytes
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.training.config import TrainingConfig
from megadiff.training.ddp import wrap_ddp
from megadiff.training.loop import build_optimizer


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def trained_pairs(opt):
    """(model parameter, the tensor Adam updates for it, fp32 master copy or None) of a
    megatron-core (sub-)optimizer: distributed (shards), mixed precision, or fp32."""
    for model_groups, main_groups, master in (
        ("model_float16_groups", "shard_fp32_from_float16_groups", True),  # distributed, bf16
        ("model_fp32_groups", "shard_fp32_groups", False),  # distributed, fp32 (views)
        ("float16_groups", "fp32_from_float16_groups", True),  # mixed precision
    ):
        if hasattr(opt, model_groups):
            for models, mains in zip(getattr(opt, model_groups), getattr(opt, main_groups), strict=True):
                yield from ((m, p, p if master else None) for m, p in zip(models, mains, strict=True))
    if hasattr(opt, "fp32_from_fp32_groups"):  # mixed precision: fp32 params are trained as they are
        yield from ((p, p, None) for group in opt.fp32_from_fp32_groups for p in group)
    if not hasattr(opt, "model_float16_groups") and not hasattr(opt, "float16_groups"):  # FP32Optimizer
        yield from ((p, p, None) for group in opt.optimizer.param_groups for p in group["params"])


def optimizer_bytes(optimizer, expert_ids) -> dict:
    """Adam moments + fp32 masters, split by the kind of model parameter they belong to."""
    out = {"dense": 0, "expert": 0}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_param, main, master in trained_pairs(opt):
            state = opt.optimizer.state.get(main, {})
            n = sum(v.numel() * v.element_size() for k, v in state.items() if k != "step")
            n += master.numel() * master.element_size() if master is not None else 0
            out["expert" if id(model_param) in expert_ids else "dense"] += n
    total = sum(  # every Adam state was attributed to a parameter
        v.numel() * v.element_size()
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in opt.optimizer.state.values()
        for k, v in state.items()
        if k != "step"
    )
    masters = sum(
        p.numel() * p.element_size()
        for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups")
        for group in getattr(opt, name, [])
        for p in group
    )
    assert out["dense"] + out["expert"] == total + masters, (out, total, masters)
    return out


LORA_RANK = 4


def run_case(model_cfg, layout, dtype, distributed, lora=False):
    cfg = TrainingConfig()
    cfg.parallel.use_distributed_optimizer = distributed
    experts = "sequential" if lora else "auto"  # LoRA on routed experts needs SequentialMLP
    chunks = build_model(model_cfg, layout, dtype, use_te=False if lora else None, moe_experts=experts)
    if lora:
        apply_lora(chunks, LORA_RANK, 8.0, 0.0, TARGET_MODULES, True, "kaiming", 0)
    chunks = wrap_ddp(chunks, use_distributed_optimizer=distributed)
    optimizer, _ = build_optimizer(cfg, chunks, dtype)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.step()
    params = [p for chunk in chunks for p in chunk.parameters()]
    expert_ids = {id(p) for chunk in chunks for n, p in chunk.named_parameters() if ".local_experts." in n}
    opt = optimizer_bytes(optimizer, expert_ids)
    actual = {
        "weights": storage_bytes(params),
        "grads": storage_bytes([p.main_grad for p in params if p.requires_grad]),
        "optimizer_dense": opt["dense"],
        "optimizer_expert": opt["expert"],
    }
    shape = RunShape(
        seq_len=16,
        dtype="fp32" if dtype == torch.float32 else "bf16",
        use_distributed_optimizer=distributed,
        lora_rank=LORA_RANK if lora else None,
        lora_experts=True,
    )
    f = state_bytes(
        model_cfg,
        layout,
        torch.distributed.get_world_size(),
        shape,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        edp_rank=ps.get_expert_data_parallel_rank(),
    )
    forecast = {k: getattr(f, k) for k in actual}
    return {"actual": actual, "forecast": forecast}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="tp,ep,pp[,vpp];...")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lora", action="store_true", help="one LoRA case per layout too")
    args = parser.parse_args()
    init_distributed()
    model_cfg = LLaDA2ModelConfig.from_hf_dict(preset("tiny"))
    results = {}
    for item in filter(None, args.layouts.split(";")):
        tp, ep, pp, *vpp = (int(x) for x in item.split(","))
        layout = ParallelLayout(tp=tp, ep=ep, pp=pp, vpp=vpp[0] if vpp else None)
        initialize_parallel(layout)
        for dtype in (torch.float32, torch.bfloat16):
            for distributed in (True, False):
                case = f"{layout}|{str(dtype).removeprefix('torch.')}|{'distopt' if distributed else 'plain'}"
                results[case] = run_case(model_cfg, layout, dtype, distributed)
        if args.lora:
            results[f"{layout}|bfloat16|distopt|lora"] = run_case(model_cfg, layout, torch.bfloat16, True, lora=True)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({str(rank): r for rank, r in enumerate(gathered)}, f, indent=1)


if __name__ == "__main__":
    main()
