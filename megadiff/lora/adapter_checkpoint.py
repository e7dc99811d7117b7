"""Adapter-only checkpoints of a LoRA run, in megadiff's checkpoint format.

A LoRA run saves what it trains and nothing else: the adapter tensors (under megatron-core's global
sharded keys, so any layout loads them), the optimizer state of the adapters, and the usual trainer
state (scheduler, data position, step, RNG). Base weights are frozen and stay where they came from;
megadiff.json's `lora` field records that base (megadiff.lora.base_record) and the adapter config.
The save goes through the same staged, atomic save as every checkpoint (megadiff.checkpoint.dist).

Before a LoRA run resumes, `check_resume` compares the checkpoint with the run on rank 0, before the
model is built: adapter-only vs full, the adapter config (rank, alpha, targets, experts), and the
base (present, and the same by fingerprint). `read_lora_checkpoint` gives the exporters (merged
weights, PEFT) the base dir, the full adapter state and the adapter config, without megatron-core
or a process group.
"""

import os
import re
from typing import NamedTuple

import torch

from megadiff.checkpoint import format as fmt
from megadiff.checkpoint.dist import model_state_keys, unwrap_model
from megadiff.errors import CheckpointError

from .base_record import BaseRecord, base_of_run, check_base_exists, check_same_base, record_at

# Adapter config fields that change the adapter tensors or the function they compute: a run that
# resumes a checkpoint must have the same (dropout, init and seed may change).
MATCHING_FIELDS = ("rank", "alpha", "target_modules", "experts")
# Adapter tensors, not the optimizer state (`optimizer.` or, chained, `chained_<i>.optimizer.`) about them.
_ADAPTER_KEY = re.compile(r"^(?!(chained_\d+\.)?optimizer\.).*\.lora_[AB]\.weight$")
_STACKED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.experts\.(.*)$")  # SequentialMLP's sharded keys


def adapter_meta(lora_config: dict, base: dict) -> dict:
    """megadiff.json's `lora` field of an adapter-only checkpoint (`base`: BaseRecord.to_dict())."""
    return {"adapter_only": True, "config": dict(lora_config), "base": dict(base)}


def saved_lora(meta: dict, ckpt_dir: str) -> dict | None:
    """The `lora` field of a checkpoint's megadiff.json (None for a full checkpoint), checked."""
    lora = meta.get("lora")
    if lora is None:
        return None
    if not isinstance(lora, dict) or not isinstance(lora.get("config"), dict):
        raise CheckpointError(f"{ckpt_dir}/{fmt.META_NAME}: 'lora' must hold 'config' and 'base'; it is damaged")
    BaseRecord.from_dict(lora.get("base"), f"{ckpt_dir}/{fmt.META_NAME}")
    return lora


def _describe(config: dict) -> str:
    return ", ".join(f"lora.{k}={config.get(k)!r}" for k in MATCHING_FIELDS)


def check_config_matches(saved: dict, run: dict, ckpt_dir: str) -> None:
    """Raise naming the first adapter-config field where the run differs from the checkpoint."""
    for key in MATCHING_FIELDS:
        want, have = saved.get(key), run.get(key)
        if key == "target_modules":
            want, have = sorted(want or []), sorted(have or [])
        if want != have:
            raise CheckpointError(
                f"{ckpt_dir}: its LoRA adapters were saved with lora.{key}={saved.get(key)!r}, this run has "
                f"lora.{key}={run.get(key)!r}; resume with the saved adapter config ({_describe(saved)}), or "
                f"start a new LoRA run in another checkpoint.save_dir"
            )


def check_resume(ckpt_dir: str, run_lora: dict | None, hf_dir: str | None, init_from_mcore: str | None):
    """Rank 0, before the model is built and any weight is read: raise when the run cannot resume
    `ckpt_dir`. Returns the run's BaseRecord for a LoRA run (None otherwise)."""
    meta = fmt.read_meta(ckpt_dir)
    saved = saved_lora(meta, ckpt_dir)
    if saved is None:
        if run_lora is not None:
            raise CheckpointError(
                f"{ckpt_dir}: a full checkpoint (no LoRA adapters), and this run trains LoRA adapters; resume it "
                f"without the lora section, or start the LoRA run from it with model.init_from_mcore={ckpt_dir} "
                f"and an empty checkpoint.save_dir"
            )
        return None
    if run_lora is None:
        raise CheckpointError(
            f"{ckpt_dir}: an adapter-only LoRA checkpoint ({_describe(saved['config'])}): it holds no base "
            f"weights and cannot be resumed as a full run; resume it with that lora section"
        )
    check_config_matches(saved["config"], run_lora, ckpt_dir)
    recorded = BaseRecord.from_dict(saved["base"], f"{ckpt_dir}/{fmt.META_NAME}")
    run_path = os.path.abspath(init_from_mcore or hf_dir or "")
    if not os.path.exists(run_path):
        named = {recorded.path, os.path.dirname(recorded.path) if recorded.kind == "mcore" else recorded.path}
        if run_path in named:  # the recorded base itself (an mcore base: its root or its iteration dir)
            check_base_exists(recorded, ckpt_dir, f"point {recorded.field} at its new place")
        field = "model.init_from_mcore" if init_from_mcore else "model.hf_dir"
        raise CheckpointError(f"{run_path} ({field}): not found; the adapters of {ckpt_dir} apply to {recorded.path}")
    run_base = base_of_run(hf_dir, init_from_mcore)
    check_same_base(recorded, run_base, ckpt_dir, f"point {recorded.field} at the base the adapters were trained on")
    return run_base


# ---- what is saved --------------------------------------------------------------------------------


def trainable_names(chunk) -> set[str]:
    return {name for name, p in unwrap_model(chunk).named_parameters() if p.requires_grad}


def adapter_sharded_state_dict(chunks, model_state: dict) -> dict:
    """`model_state` (megadiff.checkpoint.model_sharded_state_dict of `chunks`) reduced to the
    trainable parameters: the adapters of a LoRA model (its base is frozen)."""
    out = {}
    for key, chunk in zip(model_state_keys(len(chunks)), chunks, strict=True):
        names = trainable_names(chunk)
        kept = {k: v for k, v in model_state[key].items() if k in names}
        if set(kept) != names:  # a trainable parameter megatron-core names otherwise: a bug, not bad input
            raise RuntimeError(f"trainable parameters missing from the sharded state dict: {sorted(names - set(kept))}")
        out[key] = kept
    return out


def load_adapter_state(chunks, state: dict) -> None:
    """Put the adapter tensors of a loaded adapter-only state into the chunks; the frozen base keeps
    its weights. Raises when the state does not give exactly the trainable parameters."""
    for key, chunk in zip(model_state_keys(len(chunks)), chunks, strict=True):
        names = trainable_names(chunk)
        if set(state[key]) != names:
            raise RuntimeError(
                f"adapter state for '{key}' has {sorted(set(state[key]) ^ names)[:3]} differing from the "
                f"model's trainable parameters"
            )
        unwrap_model(chunk).load_state_dict(state[key], strict=False)


# ---- reading for exports ------------------------------------------------------------------------


class LoraCheckpoint(NamedTuple):
    """What an exporter needs from an adapter-only checkpoint (see read_lora_checkpoint)."""

    base_dir: str  # the base's dir: an HF model dir, or a megatron iteration dir (see base_kind)
    adapters: dict[str, torch.Tensor]  # the full adapter state ("{P}.lora_A.weight", ...)
    lora_config: dict  # the lora section: rank, alpha, dropout, target_modules, experts, init, seed

    @property
    def base_kind(self) -> str:
        """ "mcore" when base_dir is a megatron checkpoint, "hf" for an HF model dir."""
        return "mcore" if os.path.isfile(os.path.join(self.base_dir, fmt.META_NAME)) else "hf"


def is_lora_checkpoint(path: str) -> bool:
    """True when `path` (a checkpoint root or iteration dir) holds an adapter-only LoRA save."""
    return fmt.read_meta(path).get("lora") is not None


def full_adapter_state_of(reader) -> dict[str, torch.Tensor]:
    """The full adapter state in a DistCheckpointReader of an adapter-only checkpoint: every adapter
    tensor of it (`*.lora_A.weight`, `*.lora_B.weight`), under its global module path; routed experts, which megatron-core stores as one
    [E, ...] tensor per weight (`...mlp.experts.experts.X`), split into `...local_experts.{e}.X`."""
    out = {}
    for key in sorted(k for k in reader.keys() if _ADAPTER_KEY.match(k)):
        tensor = reader.read(key)
        m = _STACKED_EXPERTS.match(key)
        if m:
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.local_experts.{e}.{m.group(2)}"] = tensor[e].clone()
        else:
            out[key] = tensor
    return out


def read_lora_checkpoint(path: str, base_dir: str | None = None, trust: bool = False) -> LoraCheckpoint:
    """(base dir, full adapter state, adapter config) of the adapter-only checkpoint at `path` (a
    root: its latest iteration; or an iteration dir), whatever layout saved it. `base_dir` replaces
    the recorded base path (a base that moved); either way the base's fingerprint must match the
    recorded one. Raises CheckpointError for a full checkpoint, a missing or different base."""
    ckpt_dir = fmt.resolve_checkpoint_dir(path)
    meta = fmt.read_meta(ckpt_dir)
    saved = saved_lora(meta, ckpt_dir)
    if saved is None:
        raise CheckpointError(f"{ckpt_dir}: a full checkpoint, not an adapter-only LoRA checkpoint")
    recorded = BaseRecord.from_dict(saved["base"], f"{ckpt_dir}/{fmt.META_NAME}")
    if base_dir is None:
        check_base_exists(recorded, ckpt_dir, "pass its new place as the base dir (base_dir=, --base-dir)")
    elif not os.path.exists(base_dir):
        raise CheckpointError(f"{base_dir}: the base dir given for {ckpt_dir} does not exist")
    current = record_at(recorded.kind, base_dir or recorded.path)
    check_same_base(recorded, current, ckpt_dir, "pass the base the adapters were trained on (base_dir=, --base-dir)")
    from megadiff.checkpoint.reader import DistCheckpointReader  # torch DCP: ~0.6 s, only for reading

    adapters = full_adapter_state_of(DistCheckpointReader(ckpt_dir, trust=trust))
    return LoraCheckpoint(current.path, adapters, dict(saved["config"]))
