"""A save that does not fit on its disk fails with a message that says so.

torch's zip writer reports a full disk as `unexpected pos 704 vs 598`, after minutes of writing. The
trainer instead estimates the checkpoint's size from its sharded state dict, refuses a save that
cannot fit before writing anything, and turns a failed write on a (then) full disk into "no space
left on DEVICE (needed ~N GB)".
"""

import shutil

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

from megadiff.files.disk_space import NoSpaceError, filesystem_of, human_bytes, is_disk_full

__all__ = ["NoSpaceError", "checkpoint_bytes", "no_space_error"]


def checkpoint_bytes(sharded_state_dict) -> int:
    """Bytes the tensors of this sharded state dict write, summed over all ranks (collective):
    each rank counts its main-replica shards, which are the ones dist_checkpointing writes."""
    local = sum(
        item.data.numel() * item.data.element_size()
        for item in nested_values(sharded_state_dict)
        if isinstance(item, ShardedTensor) and is_main_replica(item.replica_id) and item.data is not None
    )
    total = torch.tensor([local], dtype=torch.long)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    return int(total)


def no_space_error(save_dir: str, needed: int, error: BaseException | None = None) -> NoSpaceError | None:
    """The error to raise when a checkpoint of `needed` bytes does not fit in `save_dir` (None
    when it fits). Without `error`: the check before a save (rank 0 decides, collective). With the
    `error` a save raised: whether that was the disk filling up (no collectives)."""
    free = shutil.disk_usage(save_dir).free
    if error is None:
        verdict = [free < needed]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(verdict, src=0)
        if not verdict[0]:
            return None
    elif not (is_disk_full(error) or free < needed):
        return None
    device, mount = filesystem_of(save_dir)
    return NoSpaceError(
        f"no space left on {device} (mounted at {mount}) for the checkpoint in {save_dir}: needed "
        f"~{human_bytes(needed)}, {human_bytes(free)} free; free some space (a smaller checkpoint.keep_last deletes "
        f"older iterations) or set checkpoint.save_dir on a larger disk"
    )
