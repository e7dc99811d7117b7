"""Block-diffusion attention: FlexAttention + BlockMask vs dense-mask attention (time, peak memory).

One attention call, forward + backward, over the block-diffusion input [x_t ; x_0] (2L tokens,
LLaDA2 block size 32), with q/k/v/grad in megatron-core's [s, b, h, d] layout:

- flex:  megadiff FlexCoreAttention with the BlockMask from block_mask_for(..., "bd")
- dense: megatron-core DotProductAttention with the dense bool mask [b, 1, 2L, 2L]
         (the unfused path every mask-taking megatron backend falls back to: [b, h, s, s] scores)
- sdpa:  torch scaled_dot_product_attention with the same dense mask (second baseline)

Every (length, path) runs in a fresh child process. Peak memory is the increase during one
forward+backward after a warm-up call: on CUDA `torch.cuda.max_memory_allocated()`; on CPU the
kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before the call, with
glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so freed large buffers leave RSS. Inputs
and the mask exist before the measured call, so neither counts; mask build time and size are
reported separately. megatron's global memory buffer (DotProductAttention's score buffer) is
emptied before the measured call so it counts for dense.

    python benchmarks/bd_attention.py --lengths 1024 4096 --heads 16 --kv-heads 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("flex", "dense", "sdpa")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096], help="L (attention runs over 2L)")
    p.add_argument("--heads", type=int, default=16, help="query heads (LLaDA2-mini: 16)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (LLaDA2-mini: 4)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--docs", type=int, default=1, help="documents packed per row (equal lengths)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after warm-up (median)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ child: one measurement


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak bytes allocated above the level at enter (CUDA allocator, or CPU RSS)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base


def packed_metadata(batch, length, docs):
    import torch

    doc = torch.arange(length).div(-(-length // docs), rounding_mode="floor").expand(batch, length)
    starts = torch.searchsorted(doc[0].contiguous(), doc[0].contiguous(), right=False)
    pos = (torch.arange(length) - starts).expand(batch, length)
    return doc.contiguous(), pos.contiguous()


def mask_tile_fraction(block_mask):
    """Fraction of (query tile, key tile) pairs flex visits (partial + full tiles)."""
    visited = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks.sum()
    q_tiles, kv_tiles = block_mask.kv_indices.shape[-2:]
    return float(visited) / (block_mask.kv_num_blocks.shape[0] * q_tiles * kv_tiles)


def run_child(cfg):
    import torch

    from megadiff.diffusion.block_mask import block_mask_for
    from megadiff.diffusion.masks import block_diffusion_mask
    from megadiff.models.common.attention import FlexCoreAttention
    from megadiff.models.common.gpt import mcore_attention_mask
    from megadiff.models.llada2.config import ParallelLayout
    from megadiff.platform import init_distributed, initialize_parallel
    from megadiff.platform.cpu_flex_attention import cpu_flex_is_compiled

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    init_distributed()  # world of 1; DotProductAttention needs megatron-core's parallel state
    initialize_parallel(ParallelLayout())
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg["dtype"])
    b, L, h, hkv, d = cfg["batch"], cfg["length"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    s = 2 * L
    doc, pos = packed_metadata(b, L, cfg["docs"])
    path = cfg["path"]

    t0 = time.perf_counter()
    if path == "flex":
        mask = block_mask_for(doc, pos, "bd", cfg["block_size"], device=device)
    else:
        allowed = block_diffusion_mask(doc.to(device), pos.to(device), cfg["block_size"])
        mask = mcore_attention_mask(allowed) if path == "dense" else allowed[:, None]
    if cuda:
        torch.cuda.synchronize()
    mask_s = time.perf_counter() - t0
    if path == "flex":  # the compile-free second build is what training pays per micro-batch
        t0 = time.perf_counter()
        mask = block_mask_for(doc, pos, "bd", cfg["block_size"], device=device)
        if cuda:
            torch.cuda.synchronize()
        mask_s = time.perf_counter() - t0
        parts = (
            mask.kv_num_blocks,
            mask.kv_indices,
            mask.full_kv_num_blocks,
            mask.full_kv_indices,
            mask.q_num_blocks,
            mask.q_indices,
            mask.full_q_num_blocks,
            mask.full_q_indices,
        )
        mask_bytes = sum(t.numel() * t.element_size() for t in parts if t is not None)
        computed = mask_tile_fraction(mask)
    else:
        mask_bytes = mask.numel() * mask.element_size()
        computed = 1.0  # every score is computed, then masked
    allowed_fraction = float(block_diffusion_mask(doc, pos, cfg["block_size"]).float().mean())

    config = TransformerConfig(
        num_layers=1,
        hidden_size=h * d,
        num_attention_heads=h,
        num_query_groups=hkv,
        kv_channels=d,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary, attention_type="self")
    if path == "flex":
        attn = FlexCoreAttention(**args)
    elif path == "dense":
        attn = DotProductAttention(**args)
    else:

        def attn(q, k, v, m):  # [s, b, h, d] in and out, like the megatron modules
            o = torch.nn.functional.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=m, enable_gqa=True
            )
            return o.permute(2, 0, 1, 3).reshape(s, b, h * d)

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(s, b, h, d, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(s, b, hkv, d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(s, b, hkv, d, device=device, dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(s, b, h * d, device=device, dtype=dtype, generator=g)

    def step():
        out = attn(q, k, v, mask)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()  # warm-up (compiles flex on first use)
    warmup_s = time.perf_counter() - t0
    parallel_state.get_global_memory_buffer().buffer.clear()
    with PeakMemory(cuda) as mem:
        step()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(
        cfg,
        fwd_bwd_ms=1e3 * statistics.median(times),
        peak_mib=mem.peak / 2**20,
        mask_ms=1e3 * mask_s,
        mask_mib=mask_bytes / 2**20,
        computed=computed,
        allowed_fraction=allowed_fraction,
        warmup_s=warmup_s,
        flex_compiled=cpu_flex_is_compiled() if path == "flex" and not cuda else None,
        device=torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads",
    )


# ------------------------------------------------------------------ parent


def measure(cfg):
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return dict(cfg, error=f"child exited {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")


def table(results):
    rows = [
        "| L (2L tokens) | path | fwd+bwd ms | time vs dense | peak MiB | memory vs dense | "
        "mask build ms | mask MiB | scores computed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for L in sorted({r["length"] for r in results}):
        group = [r for r in results if r["length"] == L]
        dense = next((r for r in group if r["path"] == "dense" and "error" not in r), None)
        for r in group:
            head = f"| {L} ({2 * L}) | {r['path']} |"
            if "error" in r:
                rows.append(head + f" failed: {r['error'][:80]} | | | | | | |")
                continue
            t_ratio = f"{r['fwd_bwd_ms'] / dense['fwd_bwd_ms']:.2f}x" if dense else "-"
            m_ratio = f"{r['peak_mib'] / dense['peak_mib']:.3f}x" if dense else "-"
            rows.append(
                head + f" {r['fwd_bwd_ms']:,.0f} | {t_ratio} | {r['peak_mib']:,.0f} | {m_ratio} | "
                f"{r['mask_ms']:,.1f} | {r['mask_mib']:.3f} | {r['computed']:.3f} |"
            )
    return "\n".join(rows)


def main(argv=None):
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    if args.child:
        result = run_child(json.loads(args.child))
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    print(
        "python benchmarks/bd_attention.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "child" and v is not None
        ),
        flush=True,
    )
    results = []
    for L in args.lengths:
        for path in args.paths:
            cfg = dict(
                path=path,
                length=L,
                batch=args.batch,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                docs=args.docs,
                block_size=args.block_size,
                repeats=args.repeats,
                dtype=dtype,
                threads=args.threads,
            )
            t0 = time.perf_counter()
            r = measure(cfg)
            results.append(r)
            status = r.get("error") or (
                f"{r['fwd_bwd_ms']:,.0f} ms, peak {r['peak_mib']:,.0f} MiB (warm-up {r['warmup_s']:.1f} s)"
            )
            print(f"  L={L} {path}: {status} [{time.perf_counter() - t0:.0f} s]", flush=True)
    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    allowed = ", ".join(sorted({f"L={r['length']}: {r['allowed_fraction']:.3f}" for r in ok}))
    print(
        f"\n{device}, {dtype}, batch {args.batch}, {args.heads} q heads / {args.kv_heads} kv heads, "
        f"head_dim {args.head_dim}, block {args.block_size}, {args.docs} doc(s)/row; "
        f"allowed (query, key) pairs: {allowed}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
