"""Average the model weights of several checkpoints of one run: LLaDA2.0's merge of the k best
checkpoints by validation loss, written as a new megatron checkpoint.

- Which: `iterations` of one checkpoint root, or the `top_k` with the lowest `valid_loss` their
  megadiff.json records (training writes it when validation is on: train.eval_interval).
- Refused before any tensor is read, naming both checkpoints: different model configs (config.json
  fields), different megatron-core specs (tensor names), adapter-only LoRA checkpoints.
- The mean: every HF tensor (megadiff.checkpoint.hf_tensors reads a checkpoint as HF tensors at any
  layout) is summed over the inputs in fp32, one tensor at a time, divided by their number and cast
  back to the checkpoints' dtype. The sum of a tensor is then laid out as megatron-core tensors by the
  HF -> megatron converter's writer (exact: only permutations and concatenations), at layout (1,1,1),
  which every layout loads. Memory: the largest tensor, in fp32, plus one input's copy of it.
- The output holds weights only (no optimizer state), as iteration 0 of OUTPUT: start a run from it
  with `model.init_from_mcore`, or export it with tools/convert_mcore_to_hf.py. Its megadiff.json
  records what was averaged.
"""

import os
from collections.abc import Callable

import torch

from megadiff.checkpoint.format import adapter_only_error, complete_iteration_dirs, read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.hf_tensors import SPLIT, McoreInput, inspect_mcore_input, plan_hf_output, regrouped
from megadiff.errors import CheckpointError, UserError
from megadiff.platform.parallel_layout import ParallelLayout

from .hf_to_mcore import HFInput, write_mcore_checkpoint
from .io_paths import resolve_io
from .output_dir import check_output_dir

# config.json fields that say nothing about the weights' shapes or meaning
_NOT_THE_MODEL = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map", "architectures")


def pick_iterations(
    root: str, iterations: list[int] | None = None, top_k: int | None = None, phase: str | None = None, log=print
) -> list[tuple[int, dict]]:
    """[(iteration, megadiff.json)] to average: the named ones, or the top_k by recorded valid_loss
    (among the iterations saved in block-schedule `phase`, e.g. 'bd32', when given: a valid_loss is
    measured at its phase's block size, so losses of two phases are two different measures)."""
    complete = complete_iteration_dirs(root)
    if not complete:
        raise CheckpointError(f"{root}: no complete checkpoint iteration (iter_XXXXXXX with megadiff.json)")
    if iterations and phase:
        raise UserError("--phase picks the --top-k candidates; with --iterations name the iterations only")
    if iterations:
        missing = [i for i in iterations if i not in complete]
        if missing:
            raise CheckpointError(
                f"{root}: no complete iteration {missing[0]}; it has {', '.join(map(str, sorted(complete)))}"
            )
        if len(set(iterations)) != len(iterations):
            raise UserError(f"--iterations {' '.join(map(str, iterations))}: an iteration is named twice")
        return [(i, read_meta(complete[i])) for i in iterations]
    if not top_k or top_k < 1:
        raise UserError("--top-k must be >= 1 (or name --iterations)")
    scored, unscored = [], []
    if phase is not None:
        complete = {it: p for it, p in complete.items() if _phase_of(read_meta(p)) == phase}
        if not complete:
            raise CheckpointError(
                f"{root}: no complete iteration was saved in phase '{phase}' (megadiff.json extra.phase)"
            )
    for it, path in sorted(complete.items()):
        meta = read_meta(path)
        loss = (meta.get("extra") or {}).get("valid_loss")
        (scored if isinstance(loss, (int, float)) else unscored).append((it, meta))
    if len(complete) < top_k:
        raise CheckpointError(f"{root}: --top-k {top_k}, but it holds {len(complete)} complete iteration(s)")
    if len(scored) < top_k:
        raise CheckpointError(
            f"{root}: --top-k {top_k}, but only {len(scored)} of its {len(complete)} iterations record a "
            f"valid_loss (iterations without one: {', '.join(str(i) for i, _ in unscored) or 'none'}); train with "
            f"train.eval_interval (a validation runs before each save), or name --iterations"
        )
    scored.sort(key=lambda item: (item[1]["extra"]["valid_loss"], item[0]))
    phases = sorted({_phase_of(meta) or "?" for _, meta in scored[:top_k]})
    if len(phases) > 1:
        log(
            f"note: the {top_k} best iterations come from phases {', '.join(phases)}, whose valid_loss are measured at "
            f"different block sizes; --phase NAME ranks one phase's checkpoints only"
        )
    return scored[:top_k]


def _phase_of(meta: dict) -> str | None:
    return ((meta.get("extra") or {}).get("phase") or {}).get("name")


def _model_fields(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NOT_THE_MODEL}


def check_same_model(inputs: list[McoreInput]) -> None:
    """Refuse, naming both checkpoints, inputs that are not one model: config fields or spec differ."""
    first = inputs[0]
    for other in inputs[1:]:
        a, b = _model_fields(first.config), _model_fields(other.config)
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                raise CheckpointError(
                    f"{first.ckpt_dir} and {other.ckpt_dir} hold different models: config.json field "
                    f"'{field}' is {a.get(field)!r} in the first and {b.get(field)!r} in the second; only "
                    f"checkpoints of one model config can be averaged"
                )
        if first.spec != other.spec:
            raise CheckpointError(
                f"{first.ckpt_dir} and {other.ckpt_dir} were saved with different megatron-core specs "
                f"({first.spec} and {other.spec} tensor names); convert one (tools/convert_hf_to_mcore.py --spec)"
            )
        if first.dtype != other.dtype:
            raise CheckpointError(
                f"{first.ckpt_dir} and {other.ckpt_dir} hold different dtypes ({first.dtype} and {other.dtype})"
            )


class MeanOfCheckpoints:
    """HF tensors (`get(name)`) that are the fp32 mean of the inputs' tensors, cast to their dtype."""

    def __init__(self, inputs: list[McoreInput]):
        self.inputs = inputs
        self.plans = [{item.name: item for item in plan_hf_output(src, SPLIT)} for src in inputs]
        self.read = 0

    def names(self) -> list[str]:
        return list(self.plans[0])

    def row_addresses(self, files, name, index=None):
        return None  # a mean is computed, never copied as stored bytes

    def get(self, name: str) -> torch.Tensor:
        total = None
        for src, plan in zip(self.inputs, self.plans, strict=True):
            item = plan[name]
            tensor = src.reader.read(item.key, item.offsets, item.sizes)
            if item.regroup is not None:
                tensor = regrouped(item, tensor, src.model)
            tensor = tensor.reshape(item.shape).to(torch.float32)
            total = tensor if total is None else total.add_(tensor)
            self.read += tensor.numel()
        return (total / len(self.inputs)).to(item.dtype)


def average_checkpoints(
    mcore_dir: str,
    output: str,
    iterations: list[int] | None = None,
    top_k: int | None = None,
    phase: str | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    io_mode: str = "plain",
) -> str:
    """Write the average (module docstring) of iterations of checkpoint root MCORE_DIR to OUTPUT;
    returns OUTPUT's iteration dir."""
    root = os.path.abspath(mcore_dir)
    if not os.path.isdir(root):
        raise CheckpointError(f"{mcore_dir}: --mcore-dir is not a directory")
    chosen = pick_iterations(root, iterations, top_k, phase, log)
    inputs = []
    for it, meta in chosen:
        ckpt_dir = resolve_checkpoint_dir(root, it)
        lora = adapter_only_error(ckpt_dir, meta, "averaged")
        if lora:
            raise lora
        inputs.append(inspect_mcore_input(root, it, trust_checkpoint, plain=True))
    check_same_model(inputs)
    output = check_output_dir(output, overwrite, inputs=[root], kind="mcore")
    scores = [(meta.get("extra") or {}).get("valid_loss") for _, meta in chosen]
    shown = ", ".join(
        f"{it}" + (f" (valid_loss {loss:.4f})" if loss is not None else "")
        for (it, _), loss in zip(chosen, scores, strict=True)
    )
    log(f"averaging {len(inputs)} checkpoint(s) of {root}: iterations {shown}")
    first = inputs[0]
    mean = MeanOfCheckpoints(inputs)
    source = HFInput(
        first.meta.get("hf_source_dir") or root, first.config, first.model, mean, SPLIT, first.dtype, first.family
    )
    extra = {
        "averaged_from": [
            {"checkpoint": src.ckpt_dir, "iteration": it, "valid_loss": loss}
            for src, (it, _), loss in zip(inputs, chosen, scores, strict=True)
        ],
        "average": "element-wise mean of the model weights, accumulated in fp32",
    }
    label = f"the mean of {len(inputs)} checkpoints"
    io_mode = resolve_io(io_mode, log)
    return write_mcore_checkpoint(
        source,
        output,
        ParallelLayout(),
        first.dtype,
        extra,
        progress,
        log,
        io_mode,
        first.spec,
        label=label,
        overwrite=overwrite,
    )
