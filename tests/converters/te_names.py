"""Test helpers for checkpoints under Transformer Engine names, written without Transformer Engine.

`rekey_checkpoint_to_te` copies a megadiff checkpoint and renames its tensors to the TE spec's keys
through the parameter table (the TE trainer's names: what a TE model's sharded state dict saves),
by rewriting torch DCP's `.metadata` only: data files address items by that metadata, not by name.
"""

import os
import pickle
import shutil

from megadiff.checkpoint import read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.format import META_NAME, write_json_atomic
from megadiff.models.llada2.checkpoint_keys import units_for


def local_to_te_keys(hf_config):
    return {
        a.key: b.key
        for a, b in zip(units_for(hf_config, "local"), units_for(hf_config, "te"), strict=True)
        if a.key != b.key
    }


def rekey_checkpoint_to_te(src_root, dst_root, iteration=None) -> str:
    """Copy the iteration of checkpoint ROOT `src_root` to `dst_root` with TE tensor keys (model
    tensors; keys that embed them, like per-parameter optimizer state, follow). Returns the new
    iteration dir."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    src = resolve_checkpoint_dir(str(src_root), iteration)
    meta = read_meta(src)
    renames = local_to_te_keys(meta["hf_config"])

    def rename(key):
        at = key.find("decoder.layers.")
        return key[:at] + renames[key[at:]] if at >= 0 and key[at:] in renames else key

    dst = os.path.join(str(dst_root), os.path.basename(src))
    shutil.copytree(src, dst)
    shutil.copyfile(
        os.path.join(str(src_root), "latest_checkpointed_iteration.txt"),
        os.path.join(str(dst_root), "latest_checkpointed_iteration.txt"),
    )
    metadata = FileSystemReader(src).read_metadata()
    assert any(rename(k) != k for k in metadata.state_dict_metadata), "nothing to rename"
    metadata.state_dict_metadata = {rename(k): v for k, v in metadata.state_dict_metadata.items()}
    metadata.storage_data = {
        MetadataIndex(rename(i.fqn), i.offset, i.index): v for i, v in metadata.storage_data.items()
    }
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    write_json_atomic(os.path.join(dst, META_NAME), dict(meta, spec="te"))
    return dst
