"""Training configuration: a plain dataclass tree loaded from YAML, with dotted CLI overrides.

    cfg = load_config("examples/configs/tiny_bd_sft.yaml", ["train.lr=2e-5", "parallel.tp=2"])

Every field is declared once, with its type, its default, its documentation and (for numbers) its
allowed range, via `setting(...)`. Values are checked against the annotation when they are set:
`Optional[int]` accepts an integer or null, a `Literal[...]` field one of its choices, a path field a
string. Unknown sections or keys are errors that name the file and the key, so a typo never silently
falls back to a default. `describe_config()` is what `tools/train.py --help-config` prints.
"""

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from megadiff.data.indexed import parse_blend, parse_split
from megadiff.errors import ConfigError, UserError
from megadiff.platform.parallel_layout import ParallelLayout, sequence_multiple
from megadiff.training.phases import schedule_phases

# `Optional[int]` and `int | None` are two spellings of one type with different origins.
_UNION_TYPES = (Union, UnionType)


class TrainingConfigError(UserError):
    """A training config (YAML or override) that cannot be used."""


def setting(default, doc: str, *, min=None, max=None, gt=None, lt=None):
    """A config field: its default, one line of documentation, and optional bounds for numbers
    (min/max inclusive, gt/lt exclusive). Floats must also be finite (no NaN/Inf)."""
    bounds = {k: v for k, v in dict(min=min, max=max, gt=gt, lt=lt).items() if v is not None}
    metadata = {"doc": doc, "bounds": bounds}
    if isinstance(default, list):  # a fresh list per config
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelSection:
    hf_dir: str | None = setting(None, "HF LLaDA2 dir: config.json, tokenizer and (unless init_from_mcore) weights")
    init_from_mcore: str | None = setting(None, "start from this megatron checkpoint (converted or trained)")
    tokenizer_dir: str | None = setting(None, "tokenizer dir; default: hf_dir")
    dtype: Literal["auto", "bf16", "fp32"] = setting("auto", "weights dtype; auto = bf16 on GPU, fp32 on CPU")
    attention_backend: Literal["auto", "dense", "flex"] = setting(
        "auto",
        "dense (bool mask) or flex (FlexAttention BlockMask); auto = flex on CUDA for block diffusion "
        "and packed full attention, dense otherwise (megadiff.training.attention_choice)",
    )
    mask_token_id: int | None = setting(None, "diffusion mask id; default: the tokenizer's <|mask|>", min=0)


@dataclass
class DataSection:
    train_files: str | list[str] | None = setting(None, ".jsonl / .parquet file, list of files, or a directory")
    max_seq_len: int = setting(2048, "tokens per packed row (at most config.json max_position_embeddings)", min=1)
    mode: Literal["pack", "pad_to_max"] = setting("pack", "pack several samples per row, or one padded sample per row")
    truncation: Literal["truncate", "drop"] = setting("truncate", "what to do with samples longer than max_seq_len")
    skip_bad_rows: bool = setting(False, "skip (and count) malformed rows instead of stopping at the first")
    pad_answers_to_block: bool = setting(True, "EOS after each answer up to a multiple of diffusion.block_size")
    # -- continued pretraining on Megatron indexed data (megadiff.data.pretrain), and validation rows --
    blend: list[float | str] | None = setting(
        None,
        "indexed datasets: [PREFIX, ...] or [W1, PREFIX1, W2, PREFIX2, ...] (Megatron --data-path); not with train_files",
    )
    split: str = setting("98,2,0", "train,valid,test shares of each blended dataset (Megatron --split)")
    mock: bool = setting(False, "megatron-core's mock GPT samples instead of data files (smoke runs)")
    index_cache_dir: str | None = setting(
        None, "where megatron-core caches the blend's sample indices; default: SAVE_DIR-index-cache beside save_dir"
    )
    valid_files: str | list[str] | None = setting(None, "SFT validation rows (.jsonl/.parquet, list or directory)")


@dataclass
class TrainSection:
    steps: int = setting(100, "optimizer steps", min=1)
    global_batch_size: int = setting(8, "rows (packed sequences) per optimizer step", min=1)
    micro_batch_size: int = setting(1, "rows per forward/backward on one data-parallel rank", min=1)
    lr: float = setting(1e-5, "peak learning rate", min=0.0)
    min_lr: float = setting(0.0, "learning rate at the end of the cosine decay", min=0.0)
    lr_schedule: Literal["cosine", "constant", "wsd"] = setting(
        "cosine", "decay after warmup; wsd: warmup-stable-decay (flat, then lr_decay_steps of decay to min_lr)"
    )
    warmup_steps: int = setting(0, "linear warmup from 0 to lr", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay", min=0.0)
    adam_beta1: float = setting(0.9, "AdamW beta1", min=0.0, lt=1.0)
    adam_beta2: float = setting(0.95, "AdamW beta2", min=0.0, lt=1.0)
    adam_eps: float = setting(1e-8, "AdamW epsilon", gt=0.0)
    clip_grad: float = setting(1.0, "gradient-norm clip; 0 = off", min=0.0)
    seed: int = setting(42, "seed of shuffling, noise and initialisation", min=0)
    max_consecutive_nonfinite: int = setting(5, "abort after this many NaN/Inf steps in a row", min=1)
    skip_memory_check: bool = setting(
        False, "start even when the memory forecast (tools/plan.py) exceeds the GPU's memory"
    )
    objective: Literal["sft", "dpo"] = setting(
        "sft", "sft (chat rows) or dpo (preference pairs; see the dpo section; batch sizes count pairs)"
    )
    # -- warmup-stable-decay and validation (Megatron's --lr-wsd-decay-*, --eval-interval / --eval-iters) --
    lr_decay_steps: int | None = setting(None, "wsd: the last steps, in which the LR decays to min_lr", min=1)
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = setting(
        "linear", "wsd: shape of the final decay"
    )
    eval_interval: int = setting(0, "steps between validations (also before each save and at the end); 0 = none", min=0)
    eval_iters: int = setting(10, "global batches per validation: the same samples, noised the same, each time", min=1)


@dataclass
class ParallelSection:
    tp: int = setting(1, "tensor parallel size", min=1)
    ep: int = setting(1, "expert parallel size", min=1)
    etp: int | None = setting(None, "expert tensor parallel size; default: tp without EP, 1 with EP", min=1)
    pp: int = setting(1, "pipeline parallel size", min=1)
    vpp: int | None = setting(None, "virtual pipeline chunks per PP rank (>= 2); default: none", min=2)
    cp: int = setting(
        1,
        "context parallel size: every row split over cp ranks (flex attention; data.max_seq_len a multiple of "
        "lcm(2*cp, cp*tp))",
        min=1,
    )
    use_distributed_optimizer: bool = setting(True, "shard optimizer state over data-parallel ranks")


@dataclass
class DiffusionSection:
    mode: Literal["block_diffusion", "full"] = setting(
        "block_diffusion", "block diffusion ([x_t ; x_0]) or full attention"
    )
    block_size: int = setting(32, "block length of block diffusion (and of answer padding)", min=1)
    t_low: float = setting(0.3, "noise level t ~ U(t_low, t_high)", gt=0.0, max=1.0)
    t_high: float = setting(0.8, "noise level t ~ U(t_low, t_high)", gt=0.0, max=1.0)
    loss_weight: Literal["none", "inverse_t"] = setting("none", "per-token loss weight")
    normalize: Literal["masked_tokens", "answer_tokens", "sequence"] = setting("masked_tokens", "loss denominator")
    complementary_masks: bool = setting(False, "also train on the complement of each mask")
    confidence_beta: float = setting(0.0, "CAP confidence loss weight (LLaDA2.0 uses ~2)", min=0.0)
    edit_ratio: float = setting(
        0.0,
        "editing (T2T) stream, our construction of LLaDA2.1's description: probability that a visible "
        "answer token is replaced by a random token of its own answer; 0 = off",
        min=0.0,
        max=1.0,
    )
    edit_weight: float = setting(
        1.0, "weight of the loss that predicts the original token at the replaced positions", min=0.0
    )
    # -- LLaDA2.0 continued pretraining (megadiff.training.phases, megadiff.training.embedding_noise) --
    block_schedule: list[dict] | None = setting(
        None, "phases in order, each {steps: N, block_size: B} or {steps: N, mode: full}; replaces mode and block_size"
    )
    mask_embedding_noise: dict | None = setting(
        None, "{std: S, steps: N}: Gaussian noise of std S on the embeddings of masked positions in the first N steps"
    )


@dataclass
class DPOSection:
    beta: float = setting(0.1, "DPO beta: scale of the ELBO differences inside the logistic", gt=0.0)
    mc_samples: int = setting(1, "Monte Carlo (t, mask) samples per response for its ELBO estimate", min=1)
    reference: Literal["live", "precomputed"] = setting(
        "live", "live: frozen copy of the starting weights; precomputed: a first pass stores reference ELBOs"
    )
    label_smoothing: float = setting(
        0.0, "conservative DPO: probability that a preference label is flipped", min=0.0, lt=0.5
    )


@dataclass
class CheckpointSection:
    save_dir: str | None = setting(None, "directory of the run's megatron checkpoints")
    save_interval: int = setting(0, "steps between saves; 0 = only at the end", min=0)
    keep_last: int = setting(3, "complete checkpoints to keep; 0 = all", min=0)
    resume: bool = setting(True, "continue from the latest complete checkpoint in save_dir")
    fully_reshardable_optimizer: bool = setting(False, "optimizer state resumable at another TP/EP/PP layout")
    trust_checkpoint: bool = setting(
        False, "resume / init_from_mcore without vetting the checkpoint's pickles (only for checkpoints you made)"
    )
    allow_new_data: bool = setting(
        False,
        "resume with other data (data.train_files, or settings that change its rows or their order) than the "
        "checkpoint was saved with: the new data is read from its beginning (megadiff.training.resume_config)",
    )


@dataclass
class LoggingSection:
    log_interval: int = setting(1, "steps between log lines; the host reads losses and counts once per interval", min=1)
    timers: bool = setting(False, "time data / fwd-bwd / opt of each step (synchronises the GPU at each phase)")
    progress_bar: bool = setting(
        True, "a progress bar on a terminal; otherwise (a log file) one line every log_interval steps"
    )
    metrics_file: str | None = setting(None, "jsonl file, one line per step (rank 0)")
    tensorboard_dir: str | None = setting(None, "TensorBoard log dir")
    wandb_project: str | None = setting(None, "Weights & Biases project")
    wandb_mode: Literal["offline", "online", "disabled"] = setting("offline", "Weights & Biases mode")


RECOMPUTE_MODULES = Literal["core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts"]


@dataclass
class PerfSection:
    """Speed and memory knobs, named as megatron-core names them (TransformerConfig,
    DistributedDataParallelConfig, OptimizerConfig); megadiff.training.mcore_configs passes them on
    and megadiff.training.perf_checks refuses combinations that cannot work."""

    fp8: Literal["off", "e4m3", "hybrid"] = setting(
        "off", "FP8 through Transformer Engine (linears and grouped experts)"
    )
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = setting(
        "tensorwise", "FP8 scaling recipe (mxfp8: Blackwell only; blockwise: Hopper or newer)"
    )
    moe_experts: Literal["auto", "te", "grouped", "sequential"] = setting(
        "auto",
        "routed experts: te (Transformer Engine's grouped GEMM), grouped (torch._grouped_mm, no TE), "
        "sequential (one GEMM per expert); auto = te where megatron-core can use TE, else grouped where "
        "torch._grouped_mm runs, else sequential (replaces perf.moe_grouped_gemm)",
    )
    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = setting(
        "alltoall", "MoE token dispatcher (flex = DeepEP, needs deep_ep)"
    )
    moe_permute_fusion: bool = setting(False, "fused token permutation (Transformer Engine >= 2.1)")
    moe_router_fusion: bool = setting(False, "fused router top-k and scores (Transformer Engine >= 2.6)")
    recompute_granularity: Literal["none", "selective", "full"] = setting("none", "activation recomputation")
    recompute_modules: list[RECOMPUTE_MODULES] | None = setting(
        None, "modules recomputed with selective granularity; default: core_attn"
    )
    recompute_method: Literal["uniform", "block"] | None = setting(None, "with full recompute: uniform or block")
    recompute_num_layers: int | None = setting(None, "with full recompute: layers per group / per stage", min=1)
    optimizer_cpu_offload: bool = setting(False, "keep optimizer state and step on the CPU (GPU runs)")
    overlap_grad_reduce: bool = setting(False, "overlap data-parallel gradient reduction with backward")
    overlap_param_gather: bool = setting(False, "overlap the distributed optimizer's parameter all-gather")
    bucket_size: int | None = setting(None, "DDP gradient bucket size in elements; default: megatron-core's", min=1)
    gradient_accumulation_fusion: bool | None = setting(
        None, "fused weight-gradient accumulation (apex); default: on where apex provides it on CUDA"
    )
    cross_entropy_loss_fusion: bool = setting(
        False, "megatron-core's fused vocab-parallel cross entropy (refused for now: see perf_preflight)"
    )
    xt_only_logits: bool = setting(
        True, "block diffusion: final norm, LM head and logits on the x_t half only (false: all 2S tokens)"
    )


LORA_TARGETS = Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@dataclass
class LoRASection:
    enabled: bool = setting(False, "train LoRA adapters on frozen base weights (no base grads or optimizer state)")
    rank: int = setting(16, "adapter rank r", min=1)
    alpha: float = setting(32.0, "adapter scale numerator: the adapter's output is multiplied by alpha / rank", gt=0.0)
    dropout: float = setting(0.0, "dropout on the adapter input", min=0.0, lt=1.0)
    target_modules: list[LORA_TARGETS] = setting(
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        "megatron-core linears to adapt: attention, the dense layer's MLP and the shared experts (router never)",
    )
    experts: bool = setting(False, "also adapt routed experts' linear_fc1/fc2 (one adapter per expert, on its EP rank)")
    init: Literal["kaiming", "gaussian"] = setting(
        "kaiming", "A kaiming-uniform (PEFT's default) or N(0, 1/r); B = 0; the same at every layout"
    )
    seed: int = setting(0, "seed of the adapters' initialisation (drawn per global module name)", min=0)
    init_from_peft: str | None = setting(
        None,
        "start the adapters from this Hugging Face PEFT adapter dir (same rank, alpha, targets and experts; "
        "its recorded base must be this run's)",
    )

    def adapter_config(self) -> dict:
        """The adapter config shared by the LoRA parts (megadiff.lora): what shapes and draws the
        adapters, so every field but `enabled` and where the run's adapters start from."""
        run_only = ("enabled", "init_from_peft")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in run_only}


@dataclass
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    perf: PerfSection = field(default_factory=PerfSection)
    lora: LoRASection = field(default_factory=LoRASection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- types ----------------------------------------------------------------------------------------


def describe_type(tp) -> str:
    """What a value of annotation `tp` looks like, in words for an error message."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION_TYPES:
        parts = [describe_type(a) for a in args if a is not type(None)]
        parts += ["null"] if type(None) in args else []
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list and get_origin(args[0]) is Literal:
        return "a list of " + ", ".join(map(str, get_args(args[0])))
    if origin is list and get_origin(args[0]) in _UNION_TYPES:  # list[float | str]: "a list of numbers or strings"
        return "a list of " + " or ".join(describe_type(a).removeprefix("a ") + "s" for a in get_args(args[0]))
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}[tp]


class _WrongType(Exception):
    pass


def typed_value(value, tp):
    """`value` as annotation `tp` wants it (ints accepted for floats), or _WrongType."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return typed_value(value, arg)
            except _WrongType:
                pass
        raise _WrongType
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _WrongType
    if origin is list:
        if isinstance(value, list):
            return [typed_value(v, args[0]) for v in value]
        raise _WrongType
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise _WrongType from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    raise _WrongType


BOUND_WORDS = {"min": ">=", "max": "<=", "gt": ">", "lt": "<"}
_BOUND_OK = {"min": lambda v, b: v >= b, "max": lambda v, b: v <= b, "gt": lambda v, b: v > b, "lt": lambda v, b: v < b}


def bounds_text(bounds: dict) -> str:
    return " and ".join(f"{BOUND_WORDS[k]} {b}" for k, b in bounds.items())


def bounds_problem(value, bounds: dict) -> str | None:
    """Why number `value` is outside `bounds` (see `setting`), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if all(_BOUND_OK[k](value, b) for k, b in bounds.items()):
        return None
    return "must be " + bounds_text(bounds)


# Keys that were replaced: a config that still sets one is told what to write instead.
REPLACED_KEYS = {
    "perf.moe_grouped_gemm": "was replaced by perf.moe_experts (auto | te | grouped | sequential): true meant "
    "te (Transformer Engine) or the grouped_gemm package, now te or grouped (torch._grouped_mm); false meant sequential",
}


def _set(cfg: TrainingConfig, section: str, key: str, value, where: str) -> None:
    if f"{section}.{key}" in REPLACED_KEYS:
        raise TrainingConfigError(f"{where}: {section}.{key} {REPLACED_KEYS[f'{section}.{key}']}")
    sections = {f.name for f in dataclasses.fields(TrainingConfig)}
    if section not in sections:
        hint = difflib.get_close_matches(section, sections, 1)
        raise TrainingConfigError(
            f"{where}: unknown section '{section}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
        )
    target = getattr(cfg, section)
    keys = {f.name: f for f in dataclasses.fields(target)}
    if key not in keys:
        hint = difflib.get_close_matches(key, keys, 1)
        raise TrainingConfigError(
            f"{where}: unknown key '{section}.{key}'" + (f"; did you mean '{section}.{hint[0]}'?" if hint else "")
        )
    tp = get_type_hints(type(target))[key]
    try:
        value = typed_value(value, tp)
    except _WrongType:
        if get_origin(tp) is list and get_origin(get_args(tp)[0]) is Literal and isinstance(value, list):
            choices = get_args(get_args(tp)[0])
            bad = next(v for v in value if v not in choices)
            raise TrainingConfigError(
                f"{where}: {section}.{key}: unknown entry {bad!r}; choose from {', '.join(choices)}"
            ) from None
        if get_origin(tp) is Literal or (
            get_origin(tp) in _UNION_TYPES and any(get_origin(a) is Literal for a in get_args(tp))
        ):
            raise TrainingConfigError(f"{where}: {section}.{key}={value!r} is not {describe_type(tp)}") from None
        quote = " (quote it in YAML to make it a string)" if "a string" in describe_type(tp) else ""
        raise TrainingConfigError(
            f"{where}: {section}.{key} must be {describe_type(tp)}, got {value!r}{quote}"
        ) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = bounds_problem(value, keys[key].metadata.get("bounds", {}))
        if problem:
            raise TrainingConfigError(f"{where}: {section}.{key} {problem}, got {value!r}")
    setattr(target, key, value)


# ---- reading YAML: every key once, each with its line ----------------------------------------------


def _mapping_lines(loader: yaml.SafeLoader, node, path: str, seen: set, inside: str = "") -> dict:
    """{key: line} of a mapping node; a key given twice in any mapping at or below it (PyYAML keeps
    the last one silently) raises TrainingConfigError naming both lines. `inside`: the dotted name
    of the mapping, for the message."""
    if id(node) in seen or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return {}
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _mapping_lines(loader, item, path, seen, inside)
        return {}
    lines = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *defaults` merges on purpose: its keys may be overridden
        key = loader.construct_object(key_node)
        name = f"{inside}.{key}" if inside else f"section '{key}'"
        _mapping_lines(loader, value_node, path, seen, f"{inside}.{key}" if inside else str(key))
        line = key_node.start_mark.line + 1
        if key in lines:
            raise TrainingConfigError(
                f"{path}:{line}: {name} is given twice ({_where_both(lines[key], line)}); YAML would keep only "
                "the last, silently: remove one"
            )
        lines[key] = line
    return lines


def _where_both(first: int, second: int) -> str:
    return f"both on line {first}" if first == second else f"lines {first} and {second}"


def read_yaml_config(path: str) -> tuple[dict, dict]:
    """(data, lines) of a YAML config: lines maps a section to its line and (section, key) to the
    line of that key, for messages. Duplicate keys anywhere are refused (see _mapping_lines)."""
    try:
        with open(path) as f:
            loader = yaml.SafeLoader(f)
            try:
                node = loader.get_single_node()
                lines = _section_lines(loader, node, path) if node is not None else {}
                # after the checks: constructing flattens `<<` merges into the nodes
                data = loader.construct_document(node) if node is not None else {}
            finally:
                loader.dispose()
    except OSError as e:
        raise TrainingConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TrainingConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return (data if data is not None else {}), lines


def _section_lines(loader, node, path: str) -> dict:
    lines = dict(_mapping_lines(loader, node, path, set()))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and isinstance(value_node, yaml.MappingNode):
                section = loader.construct_object(key_node)
                for key, line in _mapping_lines(loader, value_node, path, set(), str(section)).items():
                    lines[(section, key)] = line
    return lines


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainingConfig:
    cfg = TrainingConfig()
    given = {}  # "section.key" -> where it was set (file:line or the override), for check_switches
    if path:
        data, lines = read_yaml_config(path)
        if not isinstance(data, dict):
            raise TrainingConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                where = f"{path}:{lines[section]}" if section in lines else path
                raise TrainingConfigError(f"{where}: section '{section}' must be a mapping")
            for key, value in values.items():
                where = f"{path}:{lines[(section, key)]}" if (section, key) in lines else path
                _set(cfg, section, key, value, where)
                given[f"{section}.{key}"] = where
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrainingConfigError(f"override '{item}': expected section.key=value, e.g. train.lr=2e-5")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise TrainingConfigError(f"override '{item}': the value is not valid YAML; quote it") from None
        _set(cfg, section, key, value, f"override '{item}'")
        given[dotted] = f"override '{item}'"
    validate(cfg)
    check_switches(cfg, given)
    cfg.set_by_user = frozenset(given)  # the model family's recipe fills the rest (training.recipe)
    return cfg


def validate(cfg: TrainingConfig) -> None:
    """Checks that involve several fields (each field's type and range were checked when set)."""
    if not cfg.model.hf_dir:
        raise TrainingConfigError("model.hf_dir is required (config.json and tokenizer of the model)")
    check_data_schedule_and_validation(cfg)
    d = cfg.diffusion
    if not 0.0 < d.t_low <= d.t_high <= 1.0:
        raise TrainingConfigError(f"diffusion: need 0 < t_low <= t_high <= 1, got {d.t_low}, {d.t_high}")
    if cfg.train.min_lr > cfg.train.lr:
        raise TrainingConfigError(f"train.min_lr={cfg.train.min_lr} is above train.lr={cfg.train.lr}")
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save_dir:
        raise TrainingConfigError("checkpoint.save_interval is set but checkpoint.save_dir is not")
    if cfg.train.objective == "dpo" and (d.complementary_masks or d.confidence_beta or cfg.data.mode != "pack"):
        raise TrainingConfigError(
            "train.objective=dpo has its own ELBO loss and row layout: set diffusion.complementary_masks=false, "
            "diffusion.confidence_beta=0 and data.mode=pack"
        )
    if cfg.lora.enabled and cfg.lora.experts and cfg.perf.moe_experts in ("te", "grouped"):
        raise TrainingConfigError(
            f"lora.experts=true adapts each routed expert's own linears, which perf.moe_experts="
            f"{cfg.perf.moe_experts} experts do not call: set perf.moe_experts=sequential (or auto, or lora.experts=false)"
        )
    if cfg.lora.enabled and cfg.perf.moe_experts == "te":
        raise TrainingConfigError(
            "lora.enabled=true builds megatron-core's local spec (torch linears), which has no Transformer "
            "Engine experts: set perf.moe_experts=grouped, sequential or auto"
        )
    if cfg.lora.init_from_peft and not cfg.lora.enabled:
        raise TrainingConfigError(
            f"lora.init_from_peft={cfg.lora.init_from_peft} is set but lora.enabled=false: set lora.enabled=true "
            f"(and the adapter's rank, alpha, target_modules and experts)"
        )
    if cfg.lora.enabled and cfg.perf.fp8 != "off":
        raise TrainingConfigError(
            "lora.enabled=true builds megatron-core's local spec (torch linears), which has no FP8: set perf.fp8=off"
        )
    if cfg.train.warmup_steps > cfg.train.steps:
        raise TrainingConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} is more than train.steps={cfg.train.steps}: the run "
            "would end before the learning rate reaches train.lr; lower the warmup or raise the steps"
        )
    if (d.mode == "block_diffusion" or cfg.data.pad_answers_to_block) and d.block_size > cfg.data.max_seq_len:
        raise TrainingConfigError(
            f"diffusion.block_size={d.block_size} is more than data.max_seq_len={cfg.data.max_seq_len}: no block "
            "fits in a row (answers are padded to whole blocks); lower the block size or raise the row length"
        )
    check_context_parallel(cfg)
    parallel_layout(cfg)  # raises naming the parallel.* key


# ---- continued pretraining: data source, block schedule, LR decay, validation ---------------------


def check_data_schedule_and_validation(cfg: TrainingConfig) -> None:
    """The data source (SFT rows, indexed datasets or mock samples, exactly one), the block schedule,
    the embedding noise, warmup-stable-decay and validation, each refused naming its key."""
    data, train, d = cfg.data, cfg.train, cfg.diffusion
    sources = [
        k
        for k, v in (("data.train_files", data.train_files), ("data.blend", data.blend), ("data.mock", data.mock))
        if v
    ]
    if not sources:
        raise TrainingConfigError(
            "data.train_files is required (SFT rows: .jsonl/.parquet files or a directory), or data.blend "
            "(indexed datasets) for continued pretraining"
        )
    if len(sources) > 1:
        raise TrainingConfigError(f"{sources[0]} and {sources[1]} are exclusive: a run trains on one data source")
    pretraining = bool(data.blend or data.mock)
    if train.objective == "dpo" and (pretraining or d.block_schedule or train.eval_interval):
        raise TrainingConfigError(
            "train.objective=dpo trains on preference pairs (data.train_files) at one diffusion.mode, without "
            "validation: unset data.blend / data.mock, diffusion.block_schedule and train.eval_interval"
        )
    try:
        if data.blend:
            parse_blend(data.blend)
        valid_share = parse_split(data.split)[1]
        if d.block_schedule is not None:
            schedule_phases(d.block_schedule, data.max_seq_len, train.steps)
    except ValueError as e:
        raise TrainingConfigError(str(e)) from None
    noise = d.mask_embedding_noise
    if noise is not None:
        std, steps = noise.get("std"), noise.get("steps")
        if set(noise) != {"std", "steps"} or not isinstance(std, (int, float)) or isinstance(std, bool) or not std >= 0:
            raise TrainingConfigError(f"diffusion.mask_embedding_noise={noise!r}: expected {{std: S >= 0, steps: N}}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise TrainingConfigError(f"diffusion.mask_embedding_noise.steps must be an integer >= 0, got {steps!r}")
    if train.lr_schedule == "wsd":
        if train.lr_decay_steps is None:
            raise TrainingConfigError("train.lr_schedule=wsd needs train.lr_decay_steps (the steps of the final decay)")
        if train.lr_decay_steps > train.steps - train.warmup_steps:
            raise TrainingConfigError(
                f"train.lr_decay_steps={train.lr_decay_steps} does not fit after train.warmup_steps="
                f"{train.warmup_steps} in train.steps={train.steps}"
            )
    elif train.lr_decay_steps is not None:
        raise TrainingConfigError(f"train.lr_decay_steps is set but train.lr_schedule={train.lr_schedule}; set wsd")
    if train.eval_interval:
        if pretraining and not valid_share:
            raise TrainingConfigError(
                f"train.eval_interval={train.eval_interval} needs validation data, but data.split={data.split!r} "
                f"gives the blend no valid share; use e.g. data.split=98,2,0 (or train.eval_interval=0)"
            )
        if not pretraining and not data.valid_files:
            raise TrainingConfigError(
                f"train.eval_interval={train.eval_interval} needs validation data: set data.valid_files "
                f"(SFT rows, as data.train_files) or train.eval_interval=0"
            )


# Options that act only while a switch is on: (option prefix, is the switch on?, the switch, how to turn it on).
SWITCHES = (
    ("lora.", lambda c: c.lora.enabled, "lora.enabled", "lora.enabled=true"),
    ("dpo.", lambda c: c.train.objective == "dpo", "train.objective", "train.objective=dpo"),
    ("diffusion.edit_weight", lambda c: c.diffusion.edit_ratio > 0, "diffusion.edit_ratio", "diffusion.edit_ratio > 0"),
    ("perf.fp8_recipe", lambda c: c.perf.fp8 != "off", "perf.fp8", "perf.fp8=e4m3 or hybrid"),
    (
        "logging.wandb_mode",
        lambda c: bool(c.logging.wandb_project),
        "logging.wandb_project",
        "logging.wandb_project=NAME",
    ),
)


def check_switches(cfg: TrainingConfig, given: dict) -> None:
    """Refuse an option set (in the YAML or an override, `given`: key -> where) while the switch it
    depends on is off by default: `lora.rank=8` without `lora.enabled=true` would train a full
    fine-tune without a word. A switch turned off explicitly is a decision (a template that keeps a
    disabled section), so its options are then accepted."""
    for prefix, is_on, switch, turn_on in SWITCHES:
        if is_on(cfg) or switch in given:
            continue
        for key, where in given.items():
            if key.startswith(prefix) and key != switch:
                section, name = switch.split(".")
                now = getattr(getattr(cfg, section), name)
                now = {None: "null", False: "false"}.get(now, now) if not isinstance(now, float) else now
                raise TrainingConfigError(
                    f"{where}: {key} is set but {switch}={now} (the default), so it would have "
                    f"no effect: set {turn_on}, or remove {key}"
                )


def check_context_parallel(cfg: TrainingConfig) -> None:
    """parallel.cp > 1: what context parallelism needs of the rest of the config (the world size is
    checked at launch, megadiff.training.setup; recompute in megadiff.training.perf_preflight)."""
    cp, tp = cfg.parallel.cp, cfg.parallel.tp
    if cp == 1:
        return
    if cfg.model.attention_backend == "dense":
        raise TrainingConfigError(
            f"parallel.cp={cp} needs model.attention_backend=flex (or auto): each rank's queries attend to keys "
            f"gathered over the CP group through a FlexAttention BlockMask; dense [s, s] masks (megatron-core's "
            f"DotProductAttention asserts cp = 1) cannot be split"
        )
    multiple = sequence_multiple(cp, tp)
    if cfg.data.max_seq_len % multiple:
        above = -(-cfg.data.max_seq_len // multiple) * multiple
        nearest = " or ".join(str(n) for n in (above - multiple, above) if n > 0)
        raise TrainingConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len} is not a multiple of {multiple} = lcm(2*parallel.cp, "
            f"parallel.cp*parallel.tp) at parallel.cp={cp}, parallel.tp={tp}: each row is cut into 2*cp zig-zag "
            f"chunks and each rank's tokens split again over tp; use data.max_seq_len={nearest}"
        )
    if cfg.train.objective == "dpo":
        raise TrainingConfigError(
            f"train.objective=dpo with parallel.cp={cp} is not supported (a pair's ELBOs sum over responses that "
            f"context parallelism splits across ranks); use parallel.cp=1 for DPO"
        )


# ---- the layout, named as the user wrote it -------------------------------------------------------


def config_spelling(message: str) -> str:
    """A layout message in config spelling: `--tp 4` -> `parallel.tp=4`, `(--vpp)` -> `(parallel.vpp)`.
    ParallelLayout and LLaDA2ModelConfig.validate_layout speak in the converters' CLI flags."""
    message = re.sub(r"--(tp|ep|etp|pp|vpp|cp) (\d+(?:, \d+)*)", r"parallel.\1=\2", message)
    return re.sub(r"--(tp|ep|etp|pp|vpp|cp)\b", r"parallel.\1", message)


def parallel_layout(cfg: TrainingConfig):
    """The ParallelLayout of cfg.parallel; a bad one raises TrainingConfigError naming parallel.*."""
    p = cfg.parallel
    try:
        return ParallelLayout(tp=p.tp, ep=p.ep, etp=p.etp, pp=p.pp, vpp=p.vpp, cp=p.cp)
    except ConfigError as e:
        raise TrainingConfigError(config_spelling(str(e))) from None


# ---- documentation --------------------------------------------------------------------------------


def describe_config() -> str:
    """Every section.key with its type, default and documentation (tools/train.py --help-config)."""
    lines = []
    for section in dataclasses.fields(TrainingConfig):
        cls = section.default_factory
        hints = get_type_hints(cls)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            bounds = f.metadata.get("bounds", {})
            bound = f", {bounds_text(bounds)}" if bounds else ""
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            default = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
            default = default.removesuffix("\n...")
            lines.append(f"  {section.name}.{f.name} ({describe_type(hints[f.name])}{bound}; default {default})")
            if f.metadata.get("doc"):
                lines.append(f"      {f.metadata['doc']}")
    return "\n".join(lines)
