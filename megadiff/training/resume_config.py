"""What a resumed run takes from its checkpoint, and what from its own config.

A resumed run continues the checkpoint's weights, optimizer state, LR-schedule step and data
position. Its config may differ from the one the checkpoint records (megadiff.json
`extra.training_config`); `compare_with_checkpoint` compares the two on rank 0 before anything is
built, and for each changed key either refuses it or says which value applies:

- refused, since the change cannot take effect: the model (config.json of model.hf_dir describing
  another model than the checkpoint's), the Adam hyper-parameters (the restored optimizer state
  carries the saved ones), the objective (sft / dpo);
- refused unless `checkpoint.allow_new_data=true`: the data (its files, compared by realpath, and
  their content as the checkpoint's `extra.data_files` recorded it (megadiff.training.data_fingerprint;
  a checkpoint written before that record is compared by path only); and everything that changes
  the rows or their order, which makes the saved data position point elsewhere); with it,
  the new data is read from its beginning and everything else resumes;
- this run's value applies (one line each), from the resumed step on: the LR schedule
  (megatron-core's override_opt_param_scheduler), batch sizes, diffusion and DPO settings, clipping.

Logging, checkpointing and speed settings change freely; the parallel layout is checked against the
optimizer state (checkpointing.check_optimizer_layout) and a LoRA run's adapters and base against
the checkpoint's (megadiff.lora.adapter_checkpoint).
"""

import dataclasses
import os
from dataclasses import dataclass, field

from megadiff.checkpoint import format as fmt
from megadiff.errors import CheckpointError
from megadiff.models.registry import family_for_config
from megadiff.training.data_fingerprint import data_change, data_fingerprints

# Keys that change the rows, or their order, behind the saved data position.
DATA_KEYS = (
    "data.train_files",
    "data.max_seq_len",
    "data.mode",
    "data.truncation",
    "data.skip_bad_rows",
    "data.pad_answers_to_block",
    "diffusion.block_size",
    "model.tokenizer_dir",
    "train.seed",
)
# Keys whose saved value the restored state carries: a change cannot take effect.
FIXED_KEYS = {
    "train.adam_beta1": "the restored optimizer state carries the saved value",
    "train.adam_beta2": "the restored optimizer state carries the saved value",
    "train.adam_eps": "the restored optimizer state carries the saved value",
    "train.objective": "the checkpoint's optimizer and data state belong to the saved objective",
}
# Keys whose new value applies from the resumed step on, with the reason shown.
RUN_WINS = {
    "train.lr": "the LR schedule",
    "train.min_lr": "the LR schedule",
    "train.lr_schedule": "the LR schedule",
    "train.warmup_steps": "the LR schedule",
    "train.steps": "the LR schedule and the run's length",
    "train.weight_decay": "the LR schedule",
    "train.global_batch_size": "the batches",
    "train.micro_batch_size": "the batches",
    "train.clip_grad": "gradient clipping",
    "train.max_consecutive_nonfinite": "the NaN/Inf stop",
    "model.dtype": "the weights' dtype",
    "model.mask_token_id": "the noising",
}
APPLIES_SECTIONS = {"diffusion": "the noising and the loss", "dpo": "the DPO loss"}  # but DATA_KEYS
# Everything else (logging, checkpoint, perf, parallel, lora, model.attention_backend, ...) is not
# compared here.


@dataclass
class ResumePlan:
    """What `compare_with_checkpoint` decided: whether the data position is dropped (new data), and
    one line per changed key whose new value applies."""

    new_data: bool = False
    notes: list[str] = field(default_factory=list)


def _flat(config: dict) -> dict:
    return {f"{s}.{k}": v for s, section in config.items() if isinstance(section, dict) for k, v in section.items()}


def _same(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if key in ("data.train_files", "model.tokenizer_dir") and saved is not None and now is not None:
        paths = [[os.path.realpath(p) for p in (v if isinstance(v, list) else [v])] for v in (saved, now)]
        return paths[0] == paths[1]  # the same files spelled another way, or reached through a link
    return False


def _model_difference(saved_hf: dict, now_hf: dict) -> str | None:
    """The first model field on which two config.json dicts differ (None when the same model)."""
    try:
        saved_family, now_family = family_for_config(saved_hf), family_for_config(now_hf)
        if saved_family is not now_family:
            return f"a {saved_family.name} model in the checkpoint, a {now_family.name} model in model.hf_dir's config.json"
        saved = dataclasses.asdict(saved_family.config_from_hf(saved_hf))
        now = dataclasses.asdict(now_family.config_from_hf(now_hf))
    except ValueError:
        return None  # a config that does not validate is reported where it is read
    for name in saved:
        if name != "source" and saved[name] != now[name]:
            return f"{name}={saved[name]} in the checkpoint, {now[name]} in model.hf_dir's config.json"
    return None


def compare_with_checkpoint(cfg, ckpt_dir: str, hf_config: dict, log) -> ResumePlan:
    """Rank 0, before anything is built: compare the run's config `cfg` (and model.hf_dir's
    `hf_config`) with what `ckpt_dir` records (see the module docstring). Raises CheckpointError
    naming every refused key, the saved and the new value, and the way out; logs one line per
    key whose new value applies. A checkpoint without a recorded config is resumed as it is."""
    meta = fmt.read_meta(ckpt_dir)
    plan = ResumePlan()
    difference = _model_difference(meta.get("hf_config") or {}, hf_config) if meta.get("hf_config") else None
    if difference:
        raise CheckpointError(
            f"cannot resume {ckpt_dir}: it holds another model ({difference}); point model.hf_dir at the "
            f"model the checkpoint was trained from, or start a new run (empty checkpoint.save_dir)"
        )
    saved_cfg = (meta.get("extra") or {}).get("training_config")
    if not isinstance(saved_cfg, dict):
        log(f"resume: {ckpt_dir} records no training config; this run's config applies as it is")
        return plan
    saved, now = _flat(saved_cfg), _flat(cfg.to_dict())
    changed = {k: (saved[k], now[k]) for k in saved.keys() & now.keys() if not _same(k, saved[k], now[k])}

    def show(key):
        return f"{key} changed ({changed[key][0]!r} -> {changed[key][1]!r})"

    fixed = sorted(k for k in changed if k in FIXED_KEYS)
    if fixed:
        reasons = "; ".join(f"{show(k)}: {FIXED_KEYS[k]}" for k in fixed)
        raise CheckpointError(
            f"cannot resume {ckpt_dir} with this config: {reasons}. Keep the saved value, or start a new run "
            f"from these weights (model.init_from_mcore={ckpt_dir} with an empty checkpoint.save_dir: fresh "
            f"optimizer and schedule)"
        )
    data = [show(k) for k in sorted(k for k in changed if k in DATA_KEYS)]
    saved_files = (meta.get("extra") or {}).get("data_files")
    if "data.train_files" not in changed and isinstance(saved_files, list):  # else paths only (older checkpoint)
        content = data_change(saved_files, data_fingerprints(cfg.data.train_files) or [])
        if content:
            data.append(f"data.train_files: {content}")
    if data and not cfg.checkpoint.allow_new_data:
        raise CheckpointError(
            f"cannot resume {ckpt_dir} with this config: {', '.join(data)}; the checkpoint's "
            f"data position belongs to the data it was saved with. Set checkpoint.allow_new_data=true to train "
            f"on the new data from its beginning (weights, optimizer and LR schedule resume), or use the saved "
            f"values"
        )
    if data:
        plan.new_data = True
        plan.notes.append(
            f"resume: {', '.join(data)}; checkpoint.allow_new_data=true: the new data is read "
            f"from its beginning, weights, optimizer and LR schedule resume"
        )
    for key in sorted(changed):
        if key in RUN_WINS or (key.split(".")[0] in APPLIES_SECTIONS and key not in DATA_KEYS):
            what = RUN_WINS.get(key) or APPLIES_SECTIONS[key.split(".")[0]]
            plan.notes.append(f"resume: {show(key)}: this run's value applies from the resumed step on ({what})")
    if "model.init_from_mcore" in changed and not cfg.lora.enabled:
        plan.notes.append(
            f"resume: model.init_from_mcore={changed['model.init_from_mcore'][1]!r} has no effect: a resumed run's "
            f"weights come from {ckpt_dir}"
        )
    for note in plan.notes:
        log(note)
    return plan
