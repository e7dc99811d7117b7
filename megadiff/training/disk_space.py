"""A save that does not fit on its disk fails with a message that says so.

torch's zip writer reports a full disk as `unexpected pos 704 vs 598`, after minutes of writing. The
trainer instead estimates the checkpoint's size from its sharded state dict, refuses a save that
cannot fit before writing anything, and turns a failed write on a (then) full disk into "no space
left on DEVICE (needed ~N GB)".
"""

import errno
import os
import shutil

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

from megadiff.errors import CheckpointError


class NoSpaceError(CheckpointError):
    """The checkpoint does not fit on the save_dir's filesystem."""


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


def filesystem_of(path: str) -> tuple[str, str]:
    """(device, mount point) holding `path` (device from /proc/mounts; the mount point elsewhere)."""
    mount = os.path.realpath(path)
    while not os.path.exists(mount):
        mount = os.path.dirname(mount)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    device = mount
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == mount:
                    device = fields[0]  # the last mount on a point is the visible one
    except OSError:
        pass
    return device, mount


def _human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _is_enospc(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "unexpected pos" in str(error) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
    elif not (_is_enospc(error) or free < needed):
        return None
    device, mount = filesystem_of(save_dir)
    return NoSpaceError(
        f"no space left on {device} (mounted at {mount}) for the checkpoint in {save_dir}: needed "
        f"~{_human(needed)}, {_human(free)} free; free some space (a smaller checkpoint.keep_last deletes "
        f"older iterations) or set checkpoint.save_dir on a larger disk"
    )
