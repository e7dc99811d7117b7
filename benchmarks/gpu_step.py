"""One block-diffusion SFT training step on LLaDA2-mini-shaped layers: tokens/s, TFLOP/s, MFU, peak memory.

LLaDA2-mini's real hidden size, heads, vocabulary and 256 experts top-8, with --layers layers (as
many as one GPU holds), random weights, rows of --seq-len tokens ([x_t ; x_0] = 2 x seq-len input),
micro-batch --batch. For every variant that can run here (each skipped one says why):

    spec local | te   x   precision bf16 | fp8 (TE only)   x   attention dense | flex
                      x   experts: each --moe-experts choice (perf.moe_experts), or the default

a step is forward + backward (the trainer's masked-diffusion loss on the x_t-only head) + the
megatron-core optimizer step; after --warmup steps, --steps are timed (their wall-clock window is
in the results, `window`, for samplers such as `make gpu-check`'s GPU utilisation). Model FLOPs
follow megadiff.training.throughput; MFU uses its peak table. The model is built with the
trainer's TransformerConfig overrides for a config with --override / --moe-experts applied.
Unless --no-reference, the plain-PyTorch reference model (megadiff.hf, built once, on the run
device) runs forward + backward + an AdamW step on the same batch, and each variant reports its
tokens/s as a ratio over the reference's. `--tiny` runs the tiny preset on the CPU in seconds.

    python benchmarks/gpu_step.py --layers 4                                        # one GPU
    python benchmarks/gpu_step.py --no-reference --moe-experts grouped sequential   # experts A/B
    python benchmarks/gpu_step.py --tiny                                            # CPU smoke mode
"""

import argparse
import gc
import json
import time

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch
from megatron.core.optimizer import get_megatron_optimizer

from megadiff.diffusion.block_mask import block_mask_for
from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.hf import build_reference_model
from megadiff.models.common.schedule import forward_backward
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.platform import init_distributed, initialize_parallel
from megadiff.platform.device import run_device, uses_cuda
from megadiff.platform.kernels import megatron_has_te, probe_environment
from megadiff.training.batch import loss_positions
from megadiff.training.config import DiffusionSection, load_config
from megadiff.training.ddp import wrap_ddp
from megadiff.training.loss import diffusion_loss_sums
from megadiff.training.mcore_configs import ddp_config, optimizer_config, transformer_overrides
from megadiff.training.throughput import peak_tflops, step_flops

BLOCK, MASK_ID = 32, 0
MOE_EXPERTS = ("auto", "te", "grouped", "sequential")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (seconds)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (LLaDA2-mini has 20)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attention", nargs="+", default=["dense", "flex"], choices=["dense", "flex"])
    p.add_argument(
        "--moe-experts",
        nargs="+",
        choices=MOE_EXPERTS,
        default=None,
        help="routed-expert implementations to compare (perf.moe_experts); default: the config's",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a training-config override applied to every variant (repeatable), e.g. perf.moe_experts=sequential",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the plain-PyTorch reference model")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq_len, args.batch, args.warmup, args.steps, args.attention = 64, 2, 1, 1, ["dense"]
    return args


def training_configs(args) -> dict:
    """{experts choice or None: the TrainingConfig a variant is built from}; every override is
    checked here, before any model is built (a key this version lacks is a one-line error)."""
    base = ["model.hf_dir=unused", "data.train_files=unused", *args.override]
    choices = args.moe_experts or [None]
    return {c: load_config(None, base + ([f"perf.moe_experts={c}"] if c else [])) for c in choices}


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
        sample_ids=torch.zeros(b, s, dtype=torch.long), edited=torch.zeros_like(masked),
    )  # fmt: skip
    batch.update(loss_positions(batch))  # on the host, as the trainer does: the loss then reads nothing back
    batch = {k: tuple(x.to(run_device()) for x in v) if isinstance(v, tuple) else v.to(run_device())
             for k, v in batch.items()}  # fmt: skip
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


def run_variant(cfg, args, tcfg, spec, precision, backend, env) -> dict:
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    overrides = transformer_overrides(tcfg)
    if precision == "fp8":
        overrides.update(fp8="e4m3", fp8_recipe="tensorwise")
    chunks = build_model(cfg, ParallelLayout(), dtype, use_te=spec == "te", attention_backend=backend,
                         xt_only_logits=True, moe_experts=tcfg.perf.moe_experts, calculate_per_token_loss=True,
                         **overrides)  # fmt: skip
    # the routed-experts module actually built (perf.moe_experts resolved): what the variant measures
    experts = sorted({type(m).__name__ for c in chunks for n, m in c.named_modules() if n.endswith("mlp.experts")})
    chunks = wrap_ddp(chunks, ddp_config=ddp_config(tcfg), divide_by_tokens=False)
    optimizer = get_megatron_optimizer(optimizer_config(tcfg, dtype), chunks)
    batch = make_batch(cfg.vocab_size, args, backend)
    diffusion = DiffusionSection(block_size=BLOCK)
    denominator = float(batch["masked_at"][0].numel())

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
    start, window_start = time.perf_counter(), time.time()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    flops = step_flops(cfg, [{k: batch[k].cpu() for k in ("doc_ids", "sample_ids")}], "block_diffusion", BLOCK, True)
    tflops = flops / seconds / 1e12
    peak = peak_tflops(env.gpu_name, "fp8" if precision == "fp8" else "bf16") if env.on_cuda else None
    tokens = args.batch * args.seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if uses_cuda() else None,
        "step_s": seconds,
        "window": [window_start, time.time()],
        "experts": experts,
    }


def run_reference(cfg_dict, args) -> dict:
    """Plain-PyTorch LLaDA2 forward + backward + AdamW step on the same batch (tokens/s). Built
    once, directly on the run device, with the library's default initialisation (a benchmark
    needs no particular weights; three passes over 3 B parameters on the host take minutes)."""
    dtype = torch.bfloat16 if uses_cuda() else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no second copy
    try:
        with torch.device(run_device()):
            ref = build_reference_model(cfg_dict, dtype=dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-5, foreach=True)
    batch = make_batch(cfg_dict["vocab_size"], args, "dense")
    at = batch["masked_at"]

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = ref(batch["input_ids"], batch["position_ids"], batch["allowed"]).logits
        torch.nn.functional.cross_entropy(logits[at].float(), batch["targets"][at]).backward()
        optimizer.step()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    return {"tokens_per_s": args.batch * args.seq_len / seconds, "step_s": seconds}


def release_memory() -> None:
    """Free what a finished (or failed: its traceback held the frames) variant left, before the next."""
    gc.collect()
    if uses_cuda():
        torch.cuda.empty_cache()


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py: no CUDA device; use --tiny for the CPU smoke mode")
    try:
        configs = training_configs(args)
    except ValueError as e:  # TrainingConfigError: one line, before anything is built
        raise SystemExit(f"benchmarks/gpu_step.py: {e}") from None
    init_distributed()
    initialize_parallel(ParallelLayout())
    env = probe_environment()
    cfg_dict = model_dict(args)
    cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    results = {"gpu": env.gpu_name or "cpu", "config": vars(args), "variants": {}}
    if args.no_reference:
        results["reference"] = {"skipped": "--no-reference"}
    else:
        try:
            results["reference"] = run_reference(cfg_dict, args)
        except Exception as e:  # the reference is unfused: it may not fit where megatron-core does
            if not is_oom(e):
                raise
            results["reference"] = {"skipped": "out of memory"}
        release_memory()
    ref_tps = results["reference"].get("tokens_per_s")
    for spec, precision, skip in variants(env):
        for backend in args.attention:
            for experts, tcfg in configs.items():
                name = "/".join(filter(None, (spec, precision, backend, experts)))
                if skip:
                    results["variants"][name] = {"skipped": skip}
                    continue
                try:
                    r = run_variant(cfg, args, tcfg, spec, precision, backend, env)
                    r["vs_reference"] = r["tokens_per_s"] / ref_tps if ref_tps else None
                except Exception as e:
                    if not is_oom(e):
                        raise
                    r = {"skipped": "out of memory"}
                release_memory()
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
