"""Plan a diffusion SFT run (any model family: LLaDA2, LLaDA, LLaDA-MoE) before renting the cluster: per-GPU memory (weights, gradients,
optimizer state, activations, buffers) of every TP/CP/EP/ETP/PP/VPP/DP layout, the ones that fit
ranked by a first-order step-time model, each with the command line that runs it. Without a YAML
or --recompute, each layout also tries activation recompute (what flex attention allows) when it
does not fit without.

  tools/plan.py --preset llada2-mini --gpus-per-node 8 --gpu-memory-gb 80 --seq-len 4096
  tools/plan.py --preset llada-8b --mode full --seq-len 4096
  tools/plan.py --hf-dir /models/LLaDA-MoE-7B-A1B-Instruct --mode full
  tools/plan.py examples/configs/llada2_flash_bd_sft.yaml --preset llada2-flash --nodes 4 [section.key=value ...]

With a training YAML, the model (model.hf_dir's config.json, or --preset), sequence length,
batch sizes, mode, dtype and backend come from it; flags given explicitly win. Assumptions of
the model: docs/planner.md. When no layout fits, the nearest single changes that make one fit
(more nodes, recompute, a smaller micro-batch) are printed with their flags.
"""

import argparse
import json
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="training YAML (optional)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the YAML")
    p.add_argument("--hf-dir", help="HF model dir (its config.json)")
    p.add_argument(
        "--preset",
        choices=sorted(named_presets()),
        help="a named model shape (a family's preset; `tiny` is LLaDA2's, the other families' are FAMILY-tiny)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU, GB (80 for an H100)")
    p.add_argument(
        "--seq-len", "--seq-length", type=int, help="tokens per packed row S (block diffusion feeds 2S); default 4096"
    )
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int)
    p.add_argument("--mode", choices=["bd", "full"])
    p.add_argument("--dtype", choices=["bf16", "fp32"])
    p.add_argument("--attention-backend", choices=["dense", "flex"])
    p.add_argument("--fp8", action="store_true", default=None)
    p.add_argument(
        "--recompute",
        choices=["auto", "none", "selective", "full"],
        help="auto (default without a YAML): per layout the first of none / selective mlp,moe / full that fits",
    )
    p.add_argument(
        "--recompute-modules",
        help="with --recompute selective: megatron-core modules, e.g. mlp,moe (default core_attn)",
    )
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--cp", type=int, help="only layouts with this context-parallel size (default: search every size)")
    p.add_argument("--top", type=int, default=15, help="rows to print per list")
    p.add_argument("--json", action="store_true", help="print JSON (every layout, total_params, active_params)")
    return p.parse_args(argv)


def named_presets() -> dict:
    """--preset name -> (family, preset): every family's presets under their own names; a name
    several families share (`tiny`) is the first registered family's (LLaDA2), the others'
    are FAMILY-NAME."""
    from megadiff.models.registry import families

    out = {}
    for family in families().values():
        for name in family.presets:
            out[name if name not in out else f"{family.name}-{name}"] = (family, name)
    return out


def read_model(hf_dir: str | None, preset_name: str | None):
    """(family, validated config, name) of any family's model, from a preset or an HF dir's config.json."""
    from megadiff.errors import ConfigError
    from megadiff.models.registry import family_for_config

    if preset_name:
        family, name = named_presets()[preset_name]
        return family, family.config_from_hf(family.preset(name), f"preset {preset_name}"), preset_name
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the model config ({e.strerror}); pass --hf-dir or --preset") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the model config must be a JSON object")
    family = family_for_config(cfg, path)
    return family, family.config_from_hf(cfg, path), hf_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    from dataclasses import replace

    from megadiff.errors import UserError, user_error_exit
    from megadiff.planner import Hardware, RunShape, candidate_layouts, model_summary, plan_layouts
    from megadiff.planner.report import as_json, table

    try:
        shape, config_layout, config_name = RunShape(seq_len=4096, recompute="auto"), None, "CONFIG.yaml"
        hf_dir = args.hf_dir
        if args.config:
            from megadiff.training.config import load_config, parallel_layout
            from megadiff.training.memory_check import run_shape

            cfg = load_config(args.config, args.overrides)
            shape, config_layout, config_name = run_shape(cfg), parallel_layout(cfg), args.config
            hf_dir = hf_dir or cfg.model.hf_dir
        if not (hf_dir or args.preset):
            raise UserError("no model: pass --preset NAME or --hf-dir DIR (or a YAML whose model.hf_dir exists)")
        family, model, model_name = read_model(hf_dir, args.preset)
        if not args.config:  # without a YAML, the family's own recipe (LLaDA: full-attention diffusion)
            shape = replace(shape, mode="full" if family.recipe.mode == "full" else "bd")
        flags = dict(
            seq_len=args.seq_len,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            mode=args.mode,
            dtype=args.dtype,
            attention_backend=args.attention_backend,
            fp8=args.fp8,
            recompute=args.recompute,
            recompute_modules=tuple(args.recompute_modules.split(",")) if args.recompute_modules else None,
            lora_rank=args.lora_rank,
        )
        shape = replace(shape, **{k: v for k, v in flags.items() if v is not None})
        numbers = dict(vars(args), **vars(shape))
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "gpus_per_node", "nodes", "gpu_memory_gb"):
            if numbers[name] <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {numbers[name]}")
        hw = Hardware(gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_memory_gb=args.gpu_memory_gb)
        layouts = None
        if args.cp is not None:
            if args.cp <= 0:
                raise UserError(f"--cp must be positive, got {args.cp}")
            layouts = [lay for lay in candidate_layouts(model, hw.world) if lay.cp == args.cp]
        plans = plan_layouts(model, hw, shape, layouts)
    except UserError as e:
        return user_error_exit(e)
    summary = {"model": model_name, **model_summary(model), "world": hw.world, "shape": vars(shape)}
    if args.json:
        print(as_json(plans, summary, config_name))
        return 0
    print(f"+ {' '.join(['tools/plan.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(
        f"model {model_name}: {summary['total_params'] / 1e9:.2f}B parameters, {summary['active_params'] / 1e9:.2f}B "
        f"active per token; {hw.world} GPUs ({args.nodes} x {args.gpus_per_node}); S={shape.seq_len} "
        f"({shape.tokens} tokens per row, {shape.mode}), mb={shape.micro_batch_size}, gb={shape.global_batch_size}, "
        f"{shape.dtype}, {shape.attention_backend}, recompute={shape.recompute}"
    )
    if config_layout is not None:
        mine = [
            p
            for p in plans
            if p.layout == config_layout and p.use_distributed_optimizer == shape.use_distributed_optimizer
        ]
        if mine:
            verdict = "fits" if mine[0].reason is None else f"does not fit: {mine[0].reason}"
            total = f"{mine[0].memory.as_gib()['total']:.1f} GiB per GPU, " if mine[0].memory else ""
            print(f"this config's layout {config_layout}: {total}{verdict}")
        else:
            print(f"this config's layout {config_layout} does not fit {hw.world} GPUs")
    print(table(plans, config_name, args.top, hw.memory_bytes / 2**30))
    if not any(p.reason is None for p in plans):
        from megadiff.planner.suggest import describe_changes, nearest_fitting_changes

        print(describe_changes(nearest_fitting_changes(model, hw, shape), hw, config_layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
