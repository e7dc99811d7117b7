"""One block-diffusion SFT training step on LLaDA2-mini-shaped layers: tokens/s, TFLOP/s, MFU, peak memory.

LLaDA2-mini's real hidden size, heads, vocabulary and 256 experts top-8, with --layers layers (as
many as one GPU holds), random weights, rows of --seq-len tokens ([x_t ; x_0] = 2 x seq-len input),
micro-batch --batch. For every variant that can run here (each skipped one says why):

    spec local | te   x   precision bf16 | fp8 (TE only)   x   attention dense | flex

a step is forward + backward (the trainer's masked-diffusion loss on the x_t-only head) + the
megatron-core optimizer step; after --warmup steps, --steps are timed. Model FLOPs follow
megadiff.training.throughput; MFU uses its peak table. The plain-PyTorch reference model
(megadiff.hf) runs forward + backward on the same batch, and each variant reports its tokens/s as
a ratio over the reference's. `--tiny` runs the tiny preset on the CPU in seconds (CI runs it).

    python benchmarks/gpu_step.py --layers 4                # one GPU
    python benchmarks/gpu_step.py --tiny                    # CPU smoke mode
"""

import argparse
import json
import time

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch
from megatron.core.optimizer import get_megatron_optimizer

from megadiff.diffusion.block_mask import block_mask_for
from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.hf import build_reference_model
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.models.llada2.schedule import forward_backward
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.platform.device import run_device, uses_cuda
from megadiff.platform.kernels import megatron_has_te, probe_environment
from megadiff.training.config import DiffusionSection, TrainingConfig
from megadiff.training.ddp import wrap_ddp
from megadiff.training.loss import diffusion_loss_sums
from megadiff.training.mcore_configs import ddp_config, optimizer_config
from megadiff.training.throughput import peak_tflops, step_flops

BLOCK, MASK_ID = 32, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (seconds)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (LLaDA2-mini has 20)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attention", nargs="+", default=["dense", "flex"], choices=["dense", "flex"])
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq_len, args.batch, args.warmup, args.steps, args.attention = 64, 2, 1, 1, ["dense"]
    return args


def model_dict(args) -> dict:
    if args.tiny:
        return preset("tiny")
    return preset("llada2-mini", num_hidden_layers=args.layers)


def make_batch(vocab: int, args, backend: str) -> dict:
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.seq_len
    x0 = torch.randint(1, vocab, (b, s), generator=g)
    masked = torch.rand(b, s, generator=g) < 0.5
    xt = torch.where(masked, torch.full_like(x0, MASK_ID), x0)
    doc, pos = torch.zeros(b, s, dtype=torch.long), torch.arange(s).expand(b, s)
    batch = dict(
        input_ids=torch.cat([xt, x0], 1), position_ids=torch.cat([pos, pos], 1), targets=x0, masked=masked,
        t=torch.full((b, s), 0.5), loss_mask=torch.ones(b, s, dtype=torch.bool), doc_ids=doc,
        sample_ids=torch.zeros(b, s, dtype=torch.long),
    )  # fmt: skip
    batch = {k: v.to(run_device()) for k, v in batch.items()}
    if backend == "dense":
        batch["allowed"] = block_diffusion_mask(batch["doc_ids"], pos.to(run_device()), BLOCK)
    else:
        batch["allowed"] = block_mask_for(batch["doc_ids"], pos, "bd", BLOCK, run_device())
    return batch


def sync():
    if uses_cuda():
        torch.cuda.synchronize()


def variants(env) -> list[tuple[str, str, str | None]]:
    """(spec, precision, why it is skipped or None)."""
    te = megatron_has_te() and env.on_cuda
    fp8_ok = te and (env.compute_capability or (0, 0)) >= (8, 9)
    return [
        ("local", "bf16" if env.on_cuda else "fp32", None),
        ("te", "bf16", None if te else "Transformer Engine not usable here"),
        ("te", "fp8", None if fp8_ok else "needs Transformer Engine and compute capability >= 8.9"),
    ]


def run_variant(cfg, cfg_dict, args, spec, precision, backend, env) -> dict:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    overrides = dict(fp8="e4m3", fp8_recipe="tensorwise") if precision == "fp8" else {}
    chunks = build_model(cfg, ParallelLayout(), dtype, use_te=spec == "te", attention_backend=backend,
                         xt_only_logits=True, calculate_per_token_loss=True, **overrides)  # fmt: skip
    tcfg = TrainingConfig()
    chunks = wrap_ddp(chunks, ddp_config=ddp_config(tcfg))
    optimizer = get_megatron_optimizer(optimizer_config(tcfg, dtype), chunks)
    batch = make_batch(cfg.vocab_size, args, backend)
    diffusion = DiffusionSection(block_size=BLOCK)
    denominator = float(batch["masked"].sum())

    def loss_fn(b, output):
        sums = diffusion_loss_sums(output, b, diffusion)
        return sums["numerator"] / denominator, torch.zeros((), dtype=torch.int, device=run_device()), {}

    def step():
        for c in chunks:
            c.train()
            c.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(chunks, [batch], loss_fn)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if uses_cuda():
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    flops = step_flops(cfg, [batch], "block_diffusion", BLOCK, xt_only_head=True)
    tflops = flops / seconds / 1e12
    peak = peak_tflops(env.gpu_name, "fp8" if precision == "fp8" else "bf16") if env.on_cuda else None
    tokens = args.batch * args.seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if uses_cuda() else None,
        "step_s": seconds,
    }


def run_reference(cfg_dict, args) -> dict:
    """Plain-PyTorch LLaDA2 forward + backward on the same batch (tokens/s)."""
    dtype = torch.bfloat16 if uses_cuda() else torch.float32
    ref = build_reference_model(cfg_dict, seed=0, dtype=dtype).to(run_device())
    batch = make_batch(cfg_dict["vocab_size"], args, "dense")

    def step():
        ref.zero_grad(set_to_none=True)
        logits = ref(batch["input_ids"], batch["position_ids"], batch["allowed"]).logits[:, : args.seq_len]
        torch.nn.functional.cross_entropy(logits[batch["masked"]].float(), batch["targets"][batch["masked"]]).backward()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    return {"tokens_per_s": args.batch * args.seq_len / seconds, "step_s": seconds}


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py: no CUDA device; use --tiny for the CPU smoke mode")
    init_distributed()
    initialize_parallel(ParallelLayout())
    env = probe_environment()
    cfg_dict = model_dict(args)
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    results = {"gpu": env.gpu_name or "cpu", "config": vars(args), "variants": {}}
    try:
        results["reference"] = run_reference(cfg_dict, args)
    except Exception as e:  # the reference is unfused: it may not fit where megatron-core does
        if not is_oom(e):
            raise
        results["reference"] = {"skipped": "out of memory"}
    ref_tps = results["reference"].get("tokens_per_s")
    for spec, precision, skip in variants(env):
        for backend in args.attention:
            name = f"{spec}/{precision}/{backend}"
            if skip:
                results["variants"][name] = {"skipped": skip}
                continue
            try:
                r = run_variant(cfg, cfg_dict, args, spec, precision, backend, env)
                r["vs_reference"] = r["tokens_per_s"] / ref_tps if ref_tps else None
            except Exception as e:
                if not is_oom(e):
                    raise
                r = {"skipped": "out of memory"}
            finally:
                if uses_cuda():
                    torch.cuda.empty_cache()
            results["variants"][name] = r
            print(name, json.dumps(r), flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
