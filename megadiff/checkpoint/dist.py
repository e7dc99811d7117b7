"""Save and load megadiff checkpoints with megatron-core's dist_checkpointing (collective calls).

A checkpoint holds global tensors keyed by megatron-core's sharded keys, so it can be loaded at any
TP/EP/ETP/PP/VPP layout whatever layout saved it. `save_checkpoint` is what the trainer calls;
`save_checkpoint_lazily` writes the same format from tensors computed one at a time (converters);
`load_model_weights` loads only the model part (an optimizer state next to it is ignored).

Either megatron-core spec reads a checkpoint written by the other (`match_checkpoint_spec`): keys the
two specs name differently (the parameter table's `key` / `te_key`) are requested under the name the
checkpoint holds. Both specs save `_extra_state` objects (FP8 metadata; megatron-core's local linears
save None there for TE compatibility), but TE modules have more of them (TEDotProductAttention's), which a
local-spec checkpoint lacks. Left as they are, megatron-core's default strict handling
(ASSUME_OK_UNEXPECTED: requested-but-absent keys are left to the strategy) lets torch DCP fail on
them ("Missing key in checkpoint state_dict"), and torch's `load_state_dict(strict=True)` would list
them as missing keys; so a missing `_extra_state` is requested as a LocalNonpersistentObject of the
model's own value: a TE model keeps the extra state it was built with (no FP8 history; TE starts one
on its first FP8 step). A local-spec model loading a TE checkpoint ignores the extra objects
(nothing asks for them).
"""

import os
from collections.abc import Callable

import torch

from megadiff.errors import CheckpointError
from megadiff.models.registry import family_for_config

# megatron-core (about 1 s), torch DCP's reader (.untrusted) and writer (.lazy) are imported inside
# the functions that use them: the path helpers of this package serve tools that need none of them.
from .format import (
    adapter_only_error,
    build_meta,
    commit_iteration_dir,
    iteration_dir_name,
    new_nonce,
    read_meta,
    remove_tree,
    resolve_checkpoint_dir,
    staging_path,
)


def unwrap_model(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    module = chunk
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    return module


def model_state_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's names: 'model' without virtual pipeline, 'model0', 'model1', ... with it."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks) -> dict:
    """{'model': ...} (or {'model0': ..., 'model1': ...} with VPP) of sharded tensors keyed by
    global names, so a checkpoint can be loaded at any layout."""
    return {
        key: unwrap_model(chunk).sharded_state_dict()
        for key, chunk in zip(model_state_keys(len(chunks)), chunks, strict=True)
    }


def sharded_state_dict_spec(sharded_state_dict: dict) -> str:
    """'te' when the model behind a sharded state dict has Transformer Engine modules (they add
    `_extra_state` objects), else 'local': the spec recorded in megadiff.json."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    te = any(isinstance(v, ShardedObject) and v.key.endswith("_extra_state") for v in nested_values(sharded_state_dict))
    return "te" if te else "local"


def other_spec_keys(hf_config: dict) -> dict[str, str]:
    """Checkpoint key -> the same tensor's key under the other megatron-core spec, for every tensor
    the two specs name differently (both directions), from the config's family table."""
    family = family_for_config(hf_config)
    return family.mapping.other_spec_keys(family.config_from_hf(hf_config))


def key_in_other_spec(key: str, renames: dict[str, str]) -> str | None:
    """`key` (a model key, or one that embeds it, like an optimizer-state key) under the other spec,
    from `other_spec_keys(config)`; None when both specs store it under the same key."""
    at = key.find("decoder.layers.")
    if at < 0 or key[at:] not in renames:
        return None
    return key[:at] + renames[key[at:]]


def rename_sharded_keys(sharded_state_dict: dict, renames: dict[str, str]) -> int:
    """Store / request tensors under other keys (in place): `renames` maps a model key to the new one
    (`other_spec_keys`); keys that embed a model key (optimizer
    state) follow it. Returns the number of entries renamed."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    count = 0
    for item in nested_values(sharded_state_dict):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            new = key_in_other_spec(item.key, renames)
            if new is not None:
                item.key = new
                count += 1
    return count


def match_checkpoint_spec(ckpt_dir: str, sharded_state_dict: dict, hf_config: dict | None, trust: bool = False) -> dict:
    """The request `sharded_state_dict` (changed in place) adapted to a checkpoint written with the
    other megatron-core spec: tensors it holds under the other spec's key are asked for under that
    key; `_extra_state` objects it lacks become the model's own values (see the module docstring)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    stored = _checkpoint_tensor_metadata(ckpt_dir, trust)
    renames = other_spec_keys(hf_config) if isinstance(hf_config, dict) else {}
    for item in nested_values(sharded_state_dict):
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and item.key not in stored:
            new = key_in_other_spec(item.key, renames)
            if new is not None and new in stored:
                item.key = new

    def keep_own_extra_state(item):
        if isinstance(item, ShardedObject) and item.key.endswith("_extra_state") and item.unique_key not in stored:
            return LocalNonpersistentObject(item.data)
        return item

    return dict_list_map_inplace(keep_own_extra_state, sharded_state_dict)


def _rank() -> int:
    return torch.distributed.get_rank()


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _save_iteration(root: str, iteration: int, meta: dict, write: Callable[[str], None]) -> str:
    """Shared by both savers: stage, write (collective), commit on rank 0, agree on the outcome."""
    if not torch.distributed.is_initialized():
        raise RuntimeError("save_checkpoint is collective: call megadiff.platform.init_distributed() first")
    meta_json = build_meta(iteration, meta, torch.distributed.get_world_size())  # validate before work
    root = os.path.abspath(root)
    final = os.path.join(root, iteration_dir_name(iteration))
    staging = staging_path(final, _broadcast(new_nonce() if _rank() == 0 else None))
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        os.makedirs(staging)
    torch.distributed.barrier()
    try:
        write(staging)
        torch.distributed.barrier()
        error = None
        if _rank() == 0:
            try:
                commit_iteration_dir(root, iteration, staging, meta_json)
            except Exception as e:  # tell the other ranks instead of leaving them in a barrier
                error = f"{type(e).__name__}: {e}"
        error = _broadcast(error)
        if error:
            raise CheckpointError(f"{final}: committing the checkpoint failed on rank 0: {error}")
    except BaseException:
        if _rank() == 0:
            remove_tree(staging)
        raise
    return final


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, meta: dict) -> str:
    """Save `sharded_state_dict` (model, optionally optimizer etc.) as ROOT/iter_XXXXXXX, atomically.

    Collective. `meta`: hf_config (dict), layout (ParallelLayout or dict), dtype, and optionally
    hf_source_dir and extra (free-form dict); stored as megadiff.json. Returns the iteration dir."""
    from megatron.core import dist_checkpointing

    meta = {**meta, "spec": meta.get("spec") or sharded_state_dict_spec(sharded_state_dict)}
    return _save_iteration(root, iteration, meta, lambda d: dist_checkpointing.save(sharded_state_dict, d))


def save_checkpoint_lazily(
    root: str,
    iteration: int,
    sharded_state_dict: dict,
    meta: dict,
    materialize: Callable[[str], torch.Tensor],
    on_tensor: Callable[[int, int], None] | None = None,
    copier=None,
    peek: Callable[[str], object] | None = None,
    plain: bool = False,
) -> str:
    """`save_checkpoint` for a sharded state dict whose tensors are placeholders (e.g. a model
    built on the meta device): `materialize(path)` returns the real value of the entry at `path`
    (e.g. 'model.decoder.layers.0.mlp.linear_fc1.weight') when it is written, so memory holds
    about one tensor at a time (or `RowAddresses`: rows copied file to file, counted by `copier`;
    `peek(path)` gives those without reading anything, so the disk can read ahead).
    Same files as megatron-core writes, loadable at any layout; `plain`: with torch DCP's own
    writer instead (megadiff.checkpoint.lazy), one file per tensor, no `RowAddresses`."""
    from .lazy import write_lazily

    meta = {**meta, "spec": meta.get("spec") or sharded_state_dict_spec(sharded_state_dict)}
    return _save_iteration(
        root,
        iteration,
        meta,
        lambda d: write_lazily(sharded_state_dict, d, materialize, on_tensor, copier, peek, plain),
    )


def _checkpoint_tensor_metadata(ckpt_dir: str, trust: bool = False):
    from .untrusted import read_dcp_metadata

    return read_dcp_metadata(ckpt_dir, trust).state_dict_metadata


def _item_key(item) -> str | None:
    """The key a ShardedTensor / factory / ShardedObject is stored under (None for other values)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    if isinstance(item, ShardedObject):
        return item.unique_key
    if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
        return item.key
    return None


def missing_sharded_keys(ckpt_dir: str, sharded_state_dict: dict, trust: bool = False) -> list[str]:
    """Sharded keys requested by `sharded_state_dict` that the checkpoint does not hold. Raises
    CheckpointError on a global-shape mismatch (the checkpoint is for another model config)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = _checkpoint_tensor_metadata(ckpt_dir, trust)
    missing = []
    for item in nested_values(sharded_state_dict):
        key = _item_key(item)
        if key is None:
            continue
        if key not in stored:
            missing.append(key)
            continue
        if isinstance(item, ShardedTensor) and item.flattened_range is None and not item.allow_shape_mismatch:
            have = tuple(getattr(stored[key], "size", ()))
            if have != tuple(item.global_shape):
                raise CheckpointError(
                    f"{ckpt_dir}: tensor '{key}' has global shape {list(have)}, the model expects "
                    f"{list(item.global_shape)}; the checkpoint was written for another model config"
                )
    return sorted(set(missing))


def _missing_error(ckpt_dir: str, missing: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{ckpt_dir}: tensor '{missing[0]}' is not in the checkpoint ({len(missing)} missing in all); "
        f"it was written for another model config or layout family (see its megadiff.json)"
    )


def load_checkpoint(root_or_iter_dir: str, sharded_state_dict: dict, iteration: int | None = None, trust: bool = False):
    """Load what `sharded_state_dict` asks for (collective) -> (state_dict, megadiff.json dict).
    Tensors in the checkpoint that are not asked for (e.g. optimizer state) are ignored; one written
    with the other megatron-core spec loads too (`match_checkpoint_spec`). Unless `trust`, every
    pickle megatron-core would unpickle is vetted first (untrusted.vet_checkpoint)."""
    from megatron.core import dist_checkpointing

    from .untrusted import check_common_state, vet_checkpoint

    ckpt_dir = resolve_checkpoint_dir(root_or_iter_dir, iteration)
    meta = read_meta(ckpt_dir)
    vet_checkpoint(ckpt_dir, trust)
    check_common_state(ckpt_dir)
    sharded_state_dict = match_checkpoint_spec(ckpt_dir, sharded_state_dict, meta.get("hf_config"), trust)
    missing = missing_sharded_keys(ckpt_dir, sharded_state_dict, trust)
    if missing:
        raise _missing_error(ckpt_dir, missing)
    return dist_checkpointing.load(sharded_state_dict, ckpt_dir), meta


def load_model_weights(
    root_or_iter_dir: str, chunks, iteration: int | None = None, strict: bool = True, trust: bool = False
) -> dict:
    """Load the model weights of a checkpoint into `chunks` (this rank's model chunks, any layout).
    Optimizer state in the checkpoint is ignored. With strict=False, parameters the checkpoint lacks
    keep their values. Either megatron-core spec loads a checkpoint written by the other
    (`match_checkpoint_spec`). Collective. Returns the checkpoint's megadiff.json dict. `trust`: as in
    `load_checkpoint`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values

    from .untrusted import check_common_state, vet_checkpoint

    ckpt_dir = resolve_checkpoint_dir(root_or_iter_dir, iteration)
    meta = read_meta(ckpt_dir)
    adapter_only = adapter_only_error(ckpt_dir, meta, "loaded as the model's weights")
    if adapter_only:  # its model part is only adapters: say so, not "tensor ... is not in the checkpoint"
        raise adapter_only
    vet_checkpoint(ckpt_dir, trust)
    check_common_state(ckpt_dir)
    sharded = match_checkpoint_spec(ckpt_dir, model_sharded_state_dict(chunks), meta.get("hf_config"), trust)
    missing = set(missing_sharded_keys(ckpt_dir, sharded, trust))
    if missing and strict:
        raise _missing_error(ckpt_dir, sorted(missing))
    if missing:
        sharded, _ = extract_matching_values(sharded, lambda item: _item_key(item) not in missing)
    state = dist_checkpointing.load(sharded, ckpt_dir)
    for key, chunk in zip(model_state_keys(len(chunks)), chunks, strict=True):
        unwrap_model(chunk).load_state_dict(state[key], strict=strict)
    return meta
