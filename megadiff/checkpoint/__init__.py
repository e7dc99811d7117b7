"""megadiff's megatron checkpoint format, shared by the trainer and the converters.

    ROOT/iter_0000010/               megatron-core dist_checkpointing dir (torch_dist backend)
    ROOT/iter_0000010/megadiff.json  format version, iteration, HF config, hf_source_dir, layout,
                                     dtype, extra (written last: its presence means complete)
    ROOT/latest_checkpointed_iteration.txt

Saves are staged in `iter_XXXXXXX.tmp-<nonce>` and renamed when complete. Tensors are stored under
megatron-core's global sharded keys, so a checkpoint saved at one TP/EP/ETP/PP/VPP layout loads at
any other. The path helpers and `DistCheckpointReader` need neither megatron-core nor a process
group; the save/load functions are collective and import megatron-core when called.
"""

from .dist import (
    load_checkpoint,
    load_model_weights,
    model_sharded_state_dict,
    save_checkpoint,
    save_checkpoint_lazily,
)
from .format import (
    META_NAME,
    TRACKER_NAME,
    complete_iterations,
    is_complete_iteration_dir,
    latest_iteration,
    read_meta,
    resolve_checkpoint_dir,
)


def __getattr__(name):
    # The reader pulls in torch DCP (slow imports: benchmarks/RESULTS.md); tools that only need the path helpers
    # (moe_convertor) should not pay for it.
    if name == "DistCheckpointReader":
        from .reader import DistCheckpointReader

        return DistCheckpointReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "META_NAME",
    "TRACKER_NAME",
    "DistCheckpointReader",
    "complete_iterations",
    "is_complete_iteration_dir",
    "latest_iteration",
    "load_checkpoint",
    "load_model_weights",
    "model_sharded_state_dict",
    "read_meta",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "save_checkpoint_lazily",
]
