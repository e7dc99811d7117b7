"""Megatron-LM flags typed out of habit (`--tensor-model-parallel-size 2`) read as megadiff's
dotted keys (`parallel.tp=2`), each with a note, or refused with the key to use.

megadiff's trainer takes `section.key=value` overrides. People coming from Megatron-LM type its
flags; argparse would answer with a bare "unrecognized arguments". A flag is mapped when it names
one megadiff setting: by the table below (renamed ones), or by its own name (`--micro-batch-size`
is `train.micro_batch_size`, `--no-overlap-grad-reduce` is `perf.overlap_grad_reduce=false`).
Flags megadiff has no setting for are refused with what to do instead.
"""

import dataclasses
import difflib
from typing import get_args, get_type_hints

from megadiff.training.config import TrainingConfig, TrainingConfigError

# Megatron-LM flag -> megadiff key, where the names differ (or one name would fit several keys).
RENAMED = {
    "tensor-model-parallel-size": "parallel.tp",
    "pipeline-model-parallel-size": "parallel.pp",
    "expert-model-parallel-size": "parallel.ep",
    "expert-tensor-parallel-size": "parallel.etp",
    "virtual-pipeline-model-parallel-size": "parallel.vpp",
    "context-parallel-size": "parallel.cp",
    "train-iters": "train.steps",
    "lr-warmup-iters": "train.warmup_steps",
    "lr-decay-style": "train.lr_schedule",
    "seed": "train.seed",
    "seq-length": "data.max_seq_len",
    "save": "checkpoint.save_dir",
    "tokenizer-model": "model.tokenizer_dir",
    "fp8-format": "perf.fp8",
}
# Megatron-LM switches (no value) -> the override they mean.
SWITCHES = {
    "bf16": "model.dtype=bf16",
    "use-distributed-optimizer": "parallel.use_distributed_optimizer=true",
}
# Flags that are megadiff's behaviour anyway: accepted with a note, nothing to set.
ALWAYS = {
    "sequence-parallel": "megadiff uses sequence parallelism whenever parallel.tp > 1",
    "use-mcore-models": "megadiff always builds megatron-core models",
    "no-masked-softmax-fusion": "megadiff chooses fused kernels itself (megadiff.platform.kernels)",
}
# Flags with no megadiff setting: what to do instead.
INSTEAD = {
    "load": "megadiff resumes from checkpoint.save_dir (checkpoint.resume=true); to start from other weights "
    "set model.init_from_mcore=DIR",
    "fp16": "megadiff trains in bf16 or fp32: set model.dtype=bf16",
    "data-path": "set data.train_files (a .jsonl/.parquet file, a list of them or a directory)",
    "num-layers-per-virtual-pipeline-stage": "set parallel.vpp (model chunks per pipeline rank)",
    "tokenizer-type": "the tokenizer is model.hf_dir's (or model.tokenizer_dir)",
    "moe-grouped-gemm": "set perf.moe_experts (auto | te | grouped | sequential); the default auto takes Transformer "
    "Engine's grouped GEMM where it runs, else torch._grouped_mm",
}
for _shape in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads", "num-query-groups",
               "max-position-embeddings", "num-experts", "moe-router-topk", "vocab-size"):  # fmt: skip
    INSTEAD[_shape] = "the model's shape comes from model.hf_dir's config.json"


def _keys() -> dict[str, type]:
    """{"section.key": annotation} of every setting."""
    out = {}
    for section in dataclasses.fields(TrainingConfig):
        hints = get_type_hints(section.default_factory)
        out.update({f"{section.name}.{f.name}": hints[f.name] for f in dataclasses.fields(section.default_factory)})
    return out


def _is_bool(tp) -> bool:
    return tp is bool or bool in get_args(tp)


def _resolve(flag: str, keys: dict) -> tuple[str, str | None]:
    """(key, fixed value or None) for a flag name without dashes, or TrainingConfigError."""
    if flag in SWITCHES:
        key, value = SWITCHES[flag].split("=", 1)
        return key, value
    if flag in INSTEAD:
        raise TrainingConfigError(f"--{flag}: megadiff has no such setting; {INSTEAD[flag]}")
    if flag in RENAMED:
        if RENAMED[flag] in keys:
            return RENAMED[flag], None
        raise TrainingConfigError(f"--{flag}: this version of megadiff has no {RENAMED[flag]}")
    negated = flag.startswith("no-")
    name = (flag[3:] if negated else flag).replace("-", "_")
    matches = [k for k in keys if k.split(".", 1)[1] == name]
    if len(matches) > 1:
        raise TrainingConfigError(f"--{flag}: several settings are named {name} ({', '.join(matches)}); pick one")
    if not matches or (negated and not _is_bool(keys[matches[0]])):
        close = difflib.get_close_matches(name, [k.split(".", 1)[1] for k in keys], 1)
        hint = next((f"; did you mean {k}?" for k in keys if close and k.endswith("." + close[0])), "")
        raise TrainingConfigError(
            f"unknown flag --{flag}: the trainer takes a YAML config and section.key=value overrides{hint} "
            "(tools/train.py --help-config lists every key)"
        )
    return matches[0], ("false" if negated else None)


def overrides_from_megatron_flags(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(argv without the Megatron-LM flags, the overrides they mean, one note per flag). `-h`,
    `--help` and `--help-config` are left in argv. A flag megadiff cannot map raises
    TrainingConfigError naming it and the key (or what to do instead)."""
    keys = _keys()
    rest, overrides, notes = [], [], []
    i = 0
    while i < len(argv):
        start, token = i, argv[i]
        i += 1
        if not token.startswith("--") or token in ("--help", "--help-config") or token == "--":
            rest.append(token)
            continue
        flag, _, value = token[2:].partition("=")
        if flag in ALWAYS:
            notes.append(f"note: --{flag} is not needed: {ALWAYS[flag]}")
            continue
        key, fixed = _resolve(flag, keys)
        if fixed is not None:
            value = value or fixed
        elif not value:
            takes_value = not _is_bool(keys[key]) or (i < len(argv) and argv[i].lower() in ("true", "false"))
            if takes_value:
                if i >= len(argv) or argv[i].startswith("--"):
                    raise TrainingConfigError(f"--{flag} needs a value ({key}=...)")
                value, i = argv[i], i + 1
            else:
                value = "true"
        overrides.append(f"{key}={value}")
        notes.append(f"note: {' '.join(argv[start:i])} read as {key}={value}")
    return rest, overrides, notes
