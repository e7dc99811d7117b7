"""Block diffusion's output layer on the x_t half only vs on all of [x_t ; x_0] (CPU or GPU).

Times forward + backward of what the output layer does in training (final RMSNorm, LM head,
fp32 cross entropy at the masked x_t positions) over hidden states of 2L tokens, once on all 2L
("full", the old path) and once on the first L ("xt_only", perf.xt_only_logits). Also prints
the logits' size of both and, from megadiff.training.throughput's formula, the head's share of a
LLaDA2-mini step's model FLOPs at 2 x 4096 (one document per row).

    python benchmarks/xt_logits.py --tokens 512 --hidden 2048 --vocab 32768 --threads 1
"""

import argparse
import json
import statistics
import time

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch

from megadiff.models.llada2 import LLaDA2ModelConfig, preset
from megadiff.training.throughput import step_flops


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512, help="L: tokens per half (the input is 2L)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (LLaDA2-mini: 2048)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (LLaDA2: 157184; smaller on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def head_step(hidden, norm, head, targets, masked, xt_only: bool):
    length = targets.shape[0]
    h = hidden[:length] if xt_only else hidden
    logits = head(norm(h)).float()
    loss = torch.nn.functional.cross_entropy(logits[:length][masked], targets[masked], reduction="sum")
    loss.backward()
    return logits.shape[0]


def measure(args, xt_only: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    length, device = args.tokens, torch.device(args.device)
    norm = torch.nn.RMSNorm(args.hidden).to(device)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(device)
    hidden = torch.randn(2 * length, args.hidden, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (length,), generator=g).to(device)
    masked = (torch.rand(length, generator=g) < 0.5).to(device)
    head_step(hidden, norm, head, targets, masked, xt_only)  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rows = head_step(hidden, norm, head, targets, masked, xt_only)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "logits_rows": rows, "logits_mib": rows * args.vocab * 4 / 2**20}


def mini_head_share() -> dict:
    """Share of a LLaDA2-mini 2x4096 block-diffusion step's model FLOPs spent in the LM head."""
    mini = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    batch = dict(doc_ids=torch.zeros(2, 4096, dtype=torch.long), sample_ids=torch.zeros(2, 4096, dtype=torch.long))
    full = step_flops(mini, [batch], "block_diffusion", 32, xt_only_head=False)
    xt = step_flops(mini, [batch], "block_diffusion", 32, xt_only_head=True)
    return {"step_tflop_full_head": full / 1e12, "step_tflop_xt_head": xt / 1e12, "saved_fraction": 1 - xt / full}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    full, xt = measure(args, xt_only=False), measure(args, xt_only=True)
    result = {
        "config": vars(args),
        "full": full,
        "xt_only": xt,
        "time_ratio_full_over_xt": full["ms"] / xt["ms"],
        "logits_ratio": full["logits_mib"] / xt["logits_mib"],
        "mini_2x4096": mini_head_share(),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
