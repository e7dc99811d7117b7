"""Training configuration: a plain dataclass tree loaded from YAML, with dotted CLI overrides.

    cfg = load_config("examples/configs/tiny_bd_sft.yaml", ["train.lr=2e-5", "parallel.tp=2"])

Unknown sections or keys are errors that name the file and the key, so a typo never silently
falls back to a default.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import List, Optional, Union

import yaml


class TrainingConfigError(ValueError):
    """A training config (YAML or override) that cannot be used."""


@dataclass
class ModelSection:
    hf_dir: Optional[str] = None          # HF LLaDA2 dir: config, tokenizer and (unless init_from_mcore) weights
    init_from_mcore: Optional[str] = None  # start from a megatron checkpoint (converted or trained)
    tokenizer_dir: Optional[str] = None    # default: hf_dir
    dtype: str = "auto"                    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attention_backend: str = "dense"       # dense (bool mask) | flex (FlexAttention BlockMask)
    mask_token_id: Optional[int] = None    # default: the tokenizer's <|mask|>


@dataclass
class DataSection:
    train_files: Union[str, List[str], None] = None  # .jsonl / .parquet files or a directory
    max_seq_len: int = 2048
    mode: str = "pack"                     # pack | pad_to_max
    truncation: str = "truncate"           # truncate | drop (over-long samples)
    skip_bad_rows: bool = False
    pad_answers_to_block: bool = True      # EOS after each answer up to a multiple of diffusion.block_size


@dataclass
class TrainSection:
    steps: int = 100
    global_batch_size: int = 8             # rows (packed sequences) per optimizer step
    micro_batch_size: int = 1
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_schedule: str = "cosine"            # cosine | constant
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 42
    max_consecutive_nonfinite: int = 5     # abort after this many NaN/Inf steps in a row


@dataclass
class ParallelSection:
    tp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    pp: int = 1
    vpp: Optional[int] = None
    use_distributed_optimizer: bool = True


@dataclass
class DiffusionSection:
    mode: str = "block_diffusion"          # block_diffusion | full
    block_size: int = 32
    t_low: float = 0.3
    t_high: float = 0.8
    loss_weight: str = "none"              # none | inverse_t
    normalize: str = "masked_tokens"       # masked_tokens | answer_tokens | sequence
    complementary_masks: bool = False
    confidence_beta: float = 0.0           # CAP loss weight (LLaDA2.0 uses ~2)


@dataclass
class CheckpointSection:
    save_dir: Optional[str] = None
    save_interval: int = 0                 # steps between saves; 0 = only at the end
    keep_last: int = 3
    resume: bool = True                    # continue from the latest complete checkpoint in save_dir
    fully_reshardable_optimizer: bool = False  # optimizer state resumable at another TP/EP/PP layout
    trust_checkpoint: bool = False         # resume / init_from_mcore without vetting the checkpoint's pickles


@dataclass
class LoggingSection:
    log_interval: int = 1
    progress_bar: bool = True
    metrics_file: Optional[str] = None     # jsonl, one line per step (rank 0)
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"


@dataclass
class TrainingConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    ("model", "dtype"): ("auto", "bf16", "fp32"),
    ("model", "attention_backend"): ("dense", "flex"),
    ("data", "mode"): ("pack", "pad_to_max"),
    ("data", "truncation"): ("truncate", "drop"),
    ("train", "lr_schedule"): ("cosine", "constant"),
    ("diffusion", "mode"): ("block_diffusion", "full"),
    ("diffusion", "loss_weight"): ("none", "inverse_t"),
    ("diffusion", "normalize"): ("masked_tokens", "answer_tokens", "sequence"),
}


def _set(cfg: TrainingConfig, section: str, key: str, value, where: str) -> None:
    sections = {f.name for f in dataclasses.fields(TrainingConfig)}
    if section not in sections:
        hint = difflib.get_close_matches(section, sections, 1)
        raise TrainingConfigError(f"{where}: unknown section '{section}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    target = getattr(cfg, section)
    keys = {f.name: f for f in dataclasses.fields(target)}
    if key not in keys:
        hint = difflib.get_close_matches(key, keys, 1)
        raise TrainingConfigError(
            f"{where}: unknown key '{section}.{key}'" + (f"; did you mean '{section}.{hint[0]}'?" if hint else "")
        )
    default = getattr(type(target)(), key)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise TrainingConfigError(f"{where}: {section}.{key} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and not (isinstance(value, int) and not isinstance(value, bool)):
        raise TrainingConfigError(f"{where}: {section}.{key} must be an integer, got {value!r}")
    if isinstance(default, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(default, float):
        raise TrainingConfigError(f"{where}: {section}.{key} must be a number, got {value!r}")
    choices = CHOICES.get((section, key))
    if choices and value not in choices:
        raise TrainingConfigError(f"{where}: {section}.{key}={value!r} is not one of {', '.join(choices)}")
    setattr(target, key, value)


def load_config(path: Optional[str] = None, overrides: List[str] = ()) -> TrainingConfig:
    cfg = TrainingConfig()
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise TrainingConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise TrainingConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise TrainingConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise TrainingConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in values.items():
                _set(cfg, section, key, value, path)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise TrainingConfigError(f"override '{item}': expected section.key=value, e.g. train.lr=2e-5")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _set(cfg, section, key, yaml.safe_load(raw) if raw != "" else None, f"override '{item}'")
    validate(cfg)
    return cfg


def validate(cfg: TrainingConfig) -> None:
    if not cfg.model.hf_dir:
        raise TrainingConfigError("model.hf_dir is required (config.json and tokenizer of the model)")
    if not cfg.data.train_files:
        raise TrainingConfigError("data.train_files is required (.jsonl/.parquet files or a directory)")
    t = cfg.train
    if t.steps < 1 or t.global_batch_size < 1 or t.micro_batch_size < 1:
        raise TrainingConfigError("train.steps, train.global_batch_size and train.micro_batch_size must be >= 1")
    d = cfg.diffusion
    if not 0.0 < d.t_low <= d.t_high <= 1.0:
        raise TrainingConfigError(f"diffusion: need 0 < t_low <= t_high <= 1, got {d.t_low}, {d.t_high}")
    if d.block_size < 1:
        raise TrainingConfigError(f"diffusion.block_size must be >= 1, got {d.block_size}")
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save_dir:
        raise TrainingConfigError("checkpoint.save_interval is set but checkpoint.save_dir is not")
