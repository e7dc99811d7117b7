"""Copies of real checkpoints with code planted in their pickles, for the tests of
megadiff.checkpoint.untrusted. Each payload creates a marker file when unpickled without
restriction, and otherwise leaves the checkpoint loadable, so a test can check both that the
default refuses it without running it (the marker stays absent) and that --trust-checkpoint
loads it (the marker appears: the payload was live)."""

import io
import os
import pickle
import shutil

import torch


class RunsShell:
    """Unpickles as os.system(command) (the issue's example)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    """Unpickles as exec(code), i.e. None: stands in for a `None` extra state."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _iteration_dir(path: str) -> str:
    from megadiff.checkpoint.format import resolve_checkpoint_dir

    if os.path.isfile(os.path.join(path, ".metadata")):
        return path  # a dir holding a .metadata (e.g. one a link in a checkpoint points at)
    return resolve_checkpoint_dir(path)


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _load_metadata(ckpt_dir: str):
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        return pickle.load(f)  # our own, freshly written checkpoint


def _save_metadata(ckpt_dir: str, metadata) -> None:
    with open(os.path.join(ckpt_dir, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def plant_in_metadata(ckpt: str, marker: str) -> None:
    """`.metadata` gets an extra attribute whose unpickling runs `touch MARKER`."""
    ckpt_dir = _iteration_dir(ckpt)
    metadata = _load_metadata(ckpt_dir)
    metadata.__dict__["payload"] = RunsShell(f"touch {marker}")
    _save_metadata(ckpt_dir, metadata)


def replace_byte_item(ckpt: str, key_part: str, value) -> str:
    """Store `value` (torch.save'd, as megatron-core stores a ShardedObject) as the first byte item
    whose key contains `key_part`: appended to its data file, the metadata pointed at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = _iteration_dir(ckpt)
    metadata = _load_metadata(ckpt_dir)
    index = next(
        i
        for i in metadata.storage_data
        if key_part in i.fqn and isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    path = os.path.join(ckpt_dir, info.relative_path)
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    _save_metadata(ckpt_dir, metadata)
    return index.fqn


def plant_in_extra_state(ckpt: str, marker: str) -> str:
    """An `_extra_state` item whose unpickling (torch.load(weights_only=False) in DCP's load
    planner) writes MARKER and yields [None], what megatron-core's local layers store."""
    return replace_byte_item(ckpt, "_extra_state", [RunsPython(f"open({marker!r}, 'w').close()")])


def fp8_like_extra_state(ckpt: str) -> str:
    """An `_extra_state` item shaped like Transformer Engine's FP8 metadata: a uint8 tensor of
    pickle bytes, which TE would `pickle.loads`."""
    blob = bytearray(pickle.dumps({"scale_fwd": [1.0], "recipe": "DelayedScaling"}))
    return replace_byte_item(ckpt, "_extra_state", [torch.frombuffer(blob, dtype=torch.uint8)])


def point_data_outside(ckpt: str, target: str) -> None:
    """The first stored item's data file becomes a path outside the checkpoint dir."""
    ckpt_dir = _iteration_dir(ckpt)
    metadata = _load_metadata(ckpt_dir)
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = os.path.relpath(target, ckpt_dir)
    _save_metadata(ckpt_dir, metadata)


# ---- a small torch_dist checkpoint without megatron-core, and hostile edits of it -----------------


def small_checkpoint(root: str, tensors: dict | None = None) -> str:
    """ROOT/iter_0000000 as megatron-core 0.16 lays it out (DCP `.metadata` + `__0_0.distcp`,
    metadata.json naming a torch common backend, common.pt, megadiff.json), written by torch DCP in
    this process: for the checks that read files, not models. Returns the iteration dir."""
    import json

    import torch.distributed.checkpoint as dcp

    from megadiff.checkpoint.format import build_meta, iteration_dir_name

    it_dir = os.path.join(root, iteration_dir_name(0))
    os.makedirs(it_dir)
    tensors = tensors or {"decoder.final_layernorm.weight": torch.arange(64, dtype=torch.float32)}
    dcp.save(tensors, checkpoint_id=it_dir, no_dist=True)
    torch.save({}, os.path.join(it_dir, "common.pt"))
    with open(os.path.join(it_dir, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}, f)
    meta = build_meta(0, {"hf_config": {"model_type": "llada2_moe"}, "layout": {"tp": 1}, "dtype": "fp32"}, 1)
    with open(os.path.join(it_dir, "megadiff.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("0\n")
    return it_dir


def move_outside_and_link(path: str, outside: str) -> str:
    """`path` moved to `outside` and replaced by a link to it (a received tarball can hold such links)."""
    shutil.move(path, outside)
    os.symlink(outside, path)
    return outside


def claim_larger_chunks(ckpt_dir: str, key: str, factor: int) -> None:
    """The metadata says `key` is `factor` times longer than what is stored (a crafted allocation)."""
    metadata = _load_metadata(ckpt_dir)
    item = metadata.state_dict_metadata[key]
    item.size = torch.Size([item.size[0] * factor, *item.size[1:]])
    for chunk in item.chunks:
        chunk.sizes = torch.Size([chunk.sizes[0] * factor, *chunk.sizes[1:]])
    _save_metadata(ckpt_dir, metadata)


EVIL_MODEL = "evil-org/tools--modeling_llada2_moe.LLaDA2MoeModelLM"
EVIL_PIPE = "evil-org/tools--pipe.EvilPipe"
LOCAL_PIPE = {"impl": "pipe.LocalPipe", "pt": ["AutoModelForCausalLM"]}  # the dir's own code: kept


def plant_foreign_code(config: dict, field: str) -> str:
    """Make `config` name another repository's code in `field` (transformers resolves both to
    dynamic code); returns the entry as the export report names it."""
    if field == "auto_map":
        config["auto_map"]["AutoModelForCausalLM"] = EVIL_MODEL
        return f"AutoModelForCausalLM -> {EVIL_MODEL}"
    config["custom_pipelines"] = {
        "text-generation": {"impl": EVIL_PIPE, "pt": ["AutoModelForCausalLM"]},
        "fill-mask": dict(LOCAL_PIPE),
    }
    return f"custom_pipelines.text-generation.impl -> {EVIL_PIPE}"
