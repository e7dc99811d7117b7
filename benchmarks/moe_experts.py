"""Grouped (torch._grouped_mm) vs sequential routed experts: one LLaDA2 MoE layer, forward + backward (CPU proxy).

The question for a GPU without Transformer Engine is whether a step is bound by kernel launches and
host syncs; a CPU cannot time CUDA launches, but it can count what a GPU would launch and wait for:

- time: forward + backward wall time (median of --repeats), here on the CPU;
- kernel ops: aten ops dispatched during forward + backward (TorchDispatchMode) that launch a kernel
  on a GPU, i.e. all but views, metadata and allocations (`NO_KERNEL`): a proxy for CUDA launches;
- host reads: reads of tensor values by Python (`.item()`, `.tolist()`, `bool()`, `int()`,
  `float()`), each a device-to-host sync on a GPU when the tensor lives there.

Both for the whole MoE layer (megatron-core's MoELayer: router, alltoall dispatcher at EP 1,
routed experts, shared expert, as megadiff builds it) and for the routed experts module alone, on
the same weights and tokens, inside megatron-core's DDP as in training (its hooks add each weight's
gradient to its main grad); the two variants' outputs are checked equal. Cases (LLaDA2-mini's
expert shape: top-8, expert hidden 512, hidden 2048; 4096 tokens per rank):

- ep1: 256 experts on one rank (4096 tokens x top-8 = 32768 rows over 256 experts);
- ep8: the per-rank counts of EP 8 (32 local experts receiving 32768 rows; routed here by a
  32-expert router, so each rank's share arrives without the all-to-all).

    python benchmarks/moe_experts.py --threads 1 --hidden-ep1 512 --hidden-ep8 2048
"""

import argparse
import json
import statistics
import time
from collections import Counter

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset  # noqa: E402
from megadiff.models.llada2.model import build_model  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.training.ddp import wrap_ddp  # noqa: E402

VARIANTS = ("sequential", "grouped")
# aten ops that launch no kernel on a GPU: views and metadata, allocations (counted apart)
NO_KERNEL = {
    "aten.view",
    "aten._unsafe_view",
    "aten.t",
    "aten.transpose",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.slice",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten.detach",
    "aten.alias",
    "aten.expand",
    "aten.as_strided",
    "aten.permute",
    "aten.select",
    "aten.reshape",
    "aten._reshape_alias",
    "aten.chunk",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.new_empty",
    "aten.new_empty_strided",
    "aten.lift_fresh",
}
HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="ep1,ep8", help="ep1 (256 experts) and/or ep8 (32 local experts)")
    p.add_argument("--hidden-ep1", type=int, default=512, help="hidden size at ep1 (mini: 2048; see RESULTS.md)")
    p.add_argument("--hidden-ep8", type=int, default=2048, help="hidden size at ep8 (mini: 2048)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (one micro-batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads[HOST_READS[func]] += 1
        return func(*args, **(kwargs or {}))


def moe_layer(hidden: int, experts: int, variant: str):
    """Layer 1 (the first MoE layer) of a 2-layer LLaDA2-mini-shaped model, as megadiff builds it."""
    fields = preset("llada2-mini", hidden_size=hidden, num_hidden_layers=2, num_experts=experts, vocab_size=1024)
    fields.update(intermediate_size=4 * hidden, num_attention_heads=4, num_key_value_heads=1)
    initialize_parallel(ParallelLayout(), seed=1)  # the same weights for both variants
    (model,) = wrap_ddp(build_model(LLaDA2ModelConfig.from_hf_dict(fields), ParallelLayout(), moe_experts=variant))
    return model.module.decoder.layers[1].mlp


def layer_step(layer, x, w):
    out, _ = layer(x)
    (out * w).sum().backward()
    return out.detach()


def experts_step(experts, inputs, w):
    x, counts, probs = inputs
    out, _ = experts(x, counts, probs)
    (out * w).sum().backward()
    return out.detach()


def timed(step, repeats):
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def counted(step):
    """(kernel ops, all dispatched ops, host reads, host reads by kind) of one call of `step`."""
    with CountOps() as ops, CountHostReads() as reads:
        step()
    kernels = sum(n for op, n in ops.ops.items() if op not in NO_KERNEL)
    return kernels, sum(ops.ops.values()), sum(reads.reads.values()), dict(reads.reads)


def measure_variant(variant: str, hidden: int, experts: int, x, w, repeats: int):
    """(measurements, layer output) of one variant: the whole layer, then its experts alone on the
    tokens the layer handed them."""
    layer = moe_layer(hidden, experts, variant)
    captured = []
    hook = layer.experts.register_forward_pre_hook(lambda m, a: captured.append([t.detach() for t in a]))
    output = layer_step(layer, x, w)
    hook.remove()
    ex_x, counts, probs = captured[0]
    ex_inputs = (ex_x.requires_grad_(), counts, probs.requires_grad_())
    ex_w = torch.randn(ex_x.shape, generator=torch.Generator().manual_seed(1))
    layer_ms = timed(lambda: layer_step(layer, x, w), repeats)
    experts_ms = timed(lambda: experts_step(layer.experts, ex_inputs, ex_w), repeats)
    layer_kernels, layer_ops, layer_reads, layer_kinds = counted(lambda: layer_step(layer, x, w))
    experts_kernels, experts_ops, experts_reads, _ = counted(lambda: experts_step(layer.experts, ex_inputs, ex_w))
    stats = dict(
        layer_ms=layer_ms,
        layer_kernel_ops=layer_kernels,
        layer_aten_ops=layer_ops,
        layer_host_reads=layer_reads,
        layer_host_read_kinds=layer_kinds,
        experts_ms=experts_ms,
        experts_kernel_ops=experts_kernels,
        experts_aten_ops=experts_ops,
        experts_host_reads=experts_reads,
        experts_without_tokens=int((counts == 0).sum()),
    )
    return stats, output


def run_case(name: str, hidden: int, experts: int, args) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, 1, hidden, generator=g).requires_grad_()
    w = torch.randn(args.tokens, 1, hidden, generator=g)
    out = {"case": name, "hidden": hidden, "experts": experts, "tokens": args.tokens, "rows": args.tokens * 8}
    outputs = {}
    for variant in VARIANTS:
        out[variant], outputs[variant] = measure_variant(variant, hidden, experts, x, w, args.repeats)
        print(json.dumps({name: {variant: out[variant]}}), flush=True)
    seq, grp = out["sequential"], out["grouped"]
    out["max_abs_diff"] = float((outputs["grouped"] - outputs["sequential"]).abs().max())
    keys = (
        "layer_ms",
        "layer_kernel_ops",
        "layer_host_reads",
        "experts_ms",
        "experts_kernel_ops",
        "experts_host_reads",
    )
    out["ratios_grouped_over_sequential"] = {k: grp[k] / seq[k] if seq[k] else None for k in keys}
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    init_distributed()
    cases = {"ep1": (args.hidden_ep1, 256), "ep8": (args.hidden_ep8, 32)}
    results = [run_case(name, *cases[name], args) for name in args.cases.split(",")]
    print(json.dumps({"torch": torch.__version__, "config": vars(args), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
