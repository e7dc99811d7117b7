"""torchrun worker (1 process): what megadiff.planner predicts about a model, measured on the model.

- parameter counts of llada2-mini and llada2-flash built at full size on the meta device (no
  memory): total, and active per token (everything but the routed experts + top-k/E of them);
- bytes autograd saves per transformer layer of the CPU tiny model (fp32) for a block-diffusion
  input of 2S tokens, dense and flex backends, and with full recompute: unique storages passed to
  torch.autograd.graph.saved_tensors_hooks during forward, parameters excluded, attributed to the
  layer running at the time.
Writes {"params": {...}, "activations": {case: {"measured": [per layer], "forecast": [...]}}}.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch

from megadiff.diffusion.block_mask import block_mask_for
from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.models.common.gpt import forward_chunk
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.model import build_model
from megadiff.planner.memory import RunShape, activation_bytes_per_layer
from megadiff.platform import init_distributed, initialize_parallel

BLOCK = 8


def meta_counts(name):
    model_cfg = LLaDA2ModelConfig.from_hf_dict(preset(name))
    with torch.device("meta"):
        (chunk,) = build_model(model_cfg, ParallelLayout(), torch.bfloat16, perform_initialization=False)
    total = routed = 0
    for n, p in chunk.named_parameters():
        total += p.numel()
        routed += p.numel() if ".local_experts." in n else 0
    active = total - routed + routed * model_cfg.num_experts_per_tok // model_cfg.num_experts
    return {"total_params": total, "active_params": active, "device": str(p.device)}


def saved_bytes_per_layer(model_cfg, backend, seq_len, recompute):
    overrides = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    )
    (chunk,) = build_model(model_cfg, ParallelLayout(), attention_backend=backend, **overrides)
    params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg.vocab_size, (1, 2 * seq_len), generator=g)
    half = torch.arange(seq_len).unsqueeze(0)
    doc = torch.zeros(1, seq_len, dtype=torch.long)
    if backend == "flex":
        mask = block_mask_for(doc, half, "bd", BLOCK)
    else:
        mask = block_diffusion_mask(doc, half, BLOCK)
    current, seen = [None], {}
    for layer in chunk.decoder.layers:
        layer.register_forward_pre_hook(lambda m, a, n=layer.layer_number - 1: current.__setitem__(0, n))
    chunk.decoder.final_layernorm.register_forward_pre_hook(lambda m, a: current.__setitem__(0, None))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (current[0], storage.nbytes())
        return t

    chunk.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward_chunk(chunk, ids, torch.cat([half, half], dim=1), mask)
    output.sum().backward()  # outside the hooks: recompute saves again during backward, transiently
    per_layer = [0] * model_cfg.num_hidden_layers
    for layer, nbytes in seen.values():
        if layer is not None:
            per_layer[layer] += nbytes
    if backend == "dense":  # the [b, 1, 2S, 2S] mask is saved once per micro-batch, not per layer
        per_layer[0] -= mask.numel() * mask.element_size()
    shape = RunShape(
        seq_len=seq_len, dtype="fp32", attention_backend=backend, recompute="full" if recompute else "none"
    )
    forecast = [
        sum(
            activation_bytes_per_layer(
                model_cfg, ParallelLayout(), shape, moe=i >= model_cfg.first_k_dense_replace
            ).values()
        )
        for i in range(model_cfg.num_hidden_layers)
    ]
    return {"measured": per_layer, "forecast": forecast}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    initialize_parallel(ParallelLayout())
    out = {"params": {name: meta_counts(name) for name in ("llada2-mini", "llada2-flash")}, "activations": {}}
    tiny = LLaDA2ModelConfig.from_hf_dict(preset("tiny"))
    for backend, seq_len, recompute in (("dense", 256, False), ("flex", 128, False), ("dense", 128, True)):
        case = f"{backend},S={seq_len}" + (",recompute=full" if recompute else "")
        out["activations"][case] = saved_bytes_per_layer(tiny, backend, seq_len, recompute)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
