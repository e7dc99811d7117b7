"""Every place megadiff depends on what a particular release of megatron-core, torch or
transformers does beyond its documented API, in one module.

Each workaround is a small function (or a name re-exported for the call sites) plus a
`Workaround` record: what it relies on, the versions it was checked on, and a `check()` that
raises when a release stops providing what it relies on (a private name is gone, a signature
moved, a record layout changed). tests/platform/test_compat.py runs every check on the installed
stack, so such a release fails CI loudly, naming the workaround, instead of failing somewhere deep
inside a conversion or a resume.

Checked on both tested stacks:
  (a) Python 3.11, torch 2.13.0, megatron-core 0.16.1, transformers 5.x
  (b) Python 3.12, torch 2.11.0, megatron-core 0.19.2, transformers 4.57.6

This module imports only the standard library at import time: every entry point installs the
megatron-core import hook from here first (megadiff.platform.install_import_hook), and that must
not pull in torch.
"""

import contextlib
import functools
import importlib.abc
import importlib.util
import inspect
import io
import logging
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

STACKS = "megatron-core 0.16.1 + torch 2.13 + transformers 5.x; megatron-core 0.19.2 + torch 2.11 + transformers 4.57.6"


class CompatError(AssertionError):
    """A release no longer provides what a workaround relies on."""


@dataclass(frozen=True)
class Workaround:
    name: str
    relies_on: str
    checked_on: str
    changed_0_16_to_0_19: str
    check: Callable[[], None]


WORKAROUNDS: list[Workaround] = []


def _workaround(name: str, relies_on: str, changed: str, checked_on: str = STACKS):
    """Register the decorated function as the `check` of workaround `name`."""

    def register(check):
        @functools.wraps(check)
        def checked():
            try:
                check()
            except CompatError:
                raise
            except Exception as e:  # an import or attribute error is the release changing too
                raise CompatError(f"{type(e).__name__}: {e}") from e

        WORKAROUNDS.append(Workaround(name, relies_on, checked_on, changed, checked))
        return check

    return register


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise CompatError(what)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _global_names(fn) -> set:
    """Names a function (and the functions nested in it) looks up as globals."""
    code, names = getattr(fn, "__code__", None), set()
    todo = [code] if code else []
    while todo:
        c = todo.pop()
        names.update(c.co_names)
        todo.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return names


# ---- megatron-core import hook: fused kernels compile on first call, not at import ----------

# Modules that call torch.compile while they are imported: `megatron.core.jit` binds
# `jit_fuser = torch.compile`, which a dozen fusion modules then apply at import time; 0.19's
# `transformer.moe.router` also decorates InferenceTopKRouter._compiled_topk_routing with
# @torch.compile directly (imported by the pipeline schedules, so by every training process).
_COMPILE_AT_IMPORT = ("megatron.core.jit", "megatron.core.transformer.moe.router")


def compile_on_first_call(compile_fn):
    """A `torch.compile` look-alike that defers calling `compile_fn` until the result is called.

    Each `torch.compile(fn)` imports TorchDynamo (sympy, networkx, ...): most of every process's
    start-up (benchmarks/RESULTS.md, "measured in passing"), paid even by tools that never call a fused function (converters, every torchrun worker).
    TorchDynamo compiles on the first call anyway, so compiled functions behave as before."""

    def deferred_compile(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred_compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)

        return call

    return deferred_compile


class _DeferCompileWhileImporting(importlib.abc.MetaPathFinder):
    """Finds one of `_COMPILE_AT_IMPORT` through the normal finders, then runs it with
    `torch.compile` swapped for the deferred one (only while that module's body runs)."""

    def __init__(self):
        self._pending = set(_COMPILE_AT_IMPORT)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._pending:
            return None
        self._pending.discard(fullname)  # once per module; also keeps find_spec below from recursing
        if not self._pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_deferred_compile(module):
            import torch

            real_compile = torch.compile
            torch.compile = compile_on_first_call(real_compile)
            try:
                exec_module(module)
            finally:
                torch.compile = real_compile

        spec.loader.exec_module = exec_with_deferred_compile
        return spec


def defer_jit_fuser_compilation() -> None:
    """Install the hook; a no-op when megatron-core is already imported or the hook is in place."""
    if _COMPILE_AT_IMPORT[0] in sys.modules or any(isinstance(f, _DeferCompileWhileImporting) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferCompileWhileImporting())


@_workaround(
    "megatron_compile_deferred_at_import",
    "megatron.core.jit binds jit_fuser = torch.compile at import; 0.19's transformer.moe.router "
    "applies @torch.compile at import",
    "0.19 added the @torch.compile in moe/router.py (the hook now covers that module too)",
)
def _check_compile_at_import():
    import megatron.core.jit as jit

    # tests/platform/test_megatron_import.py checks the effect (nothing compiles at import)
    _require(
        "jit_fuser = torch.compile" in inspect.getsource(jit),
        "megatron.core.jit no longer binds jit_fuser = torch.compile: the import hook defers nothing",
    )


# ---- dist checkpoints written by megadiff.checkpoint.lazy ----------------------------------


def save_common_state(sharded_state_dict: dict, common_state_dict: dict, checkpoint_dir: str) -> dict:
    """Store the non-sharded part of a dist checkpoint the way the installed megatron-core does,
    and return the sharded state dict to write.

    megatron-core <= 0.16 writes it to `common.pt` (TorchCommonSaveStrategy, rank 0); 0.17+ removed
    that class and stores it inside the DCP files as the ShardedObject 'common_state' (its loader
    still reads a legacy common.pt)."""
    import torch

    try:
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    except ImportError:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        return dict(
            sharded_state_dict,
            common_state=ShardedObject(
                key="common_state",
                data=common_state_dict,
                global_shape=(1,),
                global_offset=(0,),
                replica_id=torch.distributed.get_rank(),
            ),
        )
    TorchCommonSaveStrategy("torch", 1).save_common(common_state_dict, checkpoint_dir)
    return sharded_state_dict


def sharded_items_by_key(sharded_state_dict: dict):
    """megatron-core's grouping of a sharded state dict for DCP: (items by key, flat mapping,
    state-dict paths by key), main replicas only (what its torch_dist save writes)."""
    from megatron.core.dist_checkpointing.strategies.torch import _replace_state_dict_keys_with_sharded_keys

    return _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)


@_workaround(
    "mcore_lazy_dist_checkpoint_writer",
    "dist_checkpointing: save_preprocess(sd, validate_access_integrity), "
    "strategies.torch._replace_state_dict_keys_with_sharded_keys(sd, keep_only_main_replica), "
    "flatten_state_dict, mcore_to_pyt_state_dict, MCoreSavePlanner(flatten_state_dict=); common state "
    "in common.pt (TorchCommonSaveStrategy) or as ShardedObject 'common_state'",
    "0.17+ removed TorchCommonSaveStrategy and common.pt: the common state is the ShardedObject "
    "'common_state' inside the DCP files (save_common_state writes either)",
)
def _check_lazy_writer():
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies import common
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    _require(
        _params(save_preprocess)[:2] == ["sharded_state_dict", "validate_access_integrity"],
        f"save_preprocess{inspect.signature(save_preprocess)}",
    )
    grouping = mcore_torch._replace_state_dict_keys_with_sharded_keys
    _require("keep_only_main_replica" in _params(grouping), f"{grouping.__name__}{inspect.signature(grouping)}")
    for name in ("flatten_state_dict", "mcore_to_pyt_state_dict", "MCoreSavePlanner"):
        _require(hasattr(mcore_torch, name), f"megatron.core.dist_checkpointing.strategies.torch.{name} is gone")
    _require(
        "flatten_state_dict" in _params(mcore_torch.MCoreSavePlanner.__init__)
        or "kwargs" in str(inspect.signature(mcore_torch.MCoreSavePlanner.__init__)),
        "MCoreSavePlanner(flatten_state_dict=) is gone",
    )
    if not hasattr(common, "TorchCommonSaveStrategy"):
        source = inspect.getsource(serialization.save)
        _require(
            '"common_state"' in source or "'common_state'" in source,
            "megatron-core's save no longer stores the common state as ShardedObject 'common_state'",
        )
        _require(hasattr(serialization, "load_common_state_dict"), "load_common_state_dict is gone")


# ---- torch DCP internals and the torch.save record layout ------------------------------------


def write_dcp_item(transforms, stream, data, item, storage_key: str):
    """torch DCP's FileSystemWriter per-item writer (private `_write_item`), torch.save format."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat, _write_item

    return _write_item(transforms, stream, data, item, storage_key, SerializationFormat.TORCH_SAVE)


def dcp_storage_info(relative_path: str, offset: int, length: int):
    """Where a DCP item's record lies (private `_StorageInfo`)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(relative_path, offset, length)


def dcp_file_view(f, offset: int, length: int):
    """A read-only window on one DCP record (private `_create_file_view`)."""
    from torch.distributed.checkpoint.utils import _create_file_view

    return _create_file_view(f, offset, length)


@_workaround(
    "torch_dcp_writer_internals",
    "torch.distributed.checkpoint: filesystem._write_item(transforms, stream, data, write_item, "
    "storage_key, serialization_format), filesystem._StorageInfo(relative_path, offset, length), "
    "utils._create_file_view(file, offset, length), DEFAULT_SUFFIX, the _Checkpointable protocol "
    "(__create_write_items__/__create_chunk_list__/__get_tensor_shard__)",
    "nothing (torch 2.11 and 2.13 alike)",
)
def _check_dcp_internals():
    from torch.distributed.checkpoint import filesystem, utils

    _require(
        _params(filesystem._write_item)
        == ["transforms", "stream", "data", "write_item", "storage_key", "serialization_format"],
        f"_write_item{inspect.signature(filesystem._write_item)}",
    )
    _require(hasattr(filesystem.SerializationFormat, "TORCH_SAVE"), "SerializationFormat.TORCH_SAVE is gone")
    _require(
        list(filesystem._StorageInfo.__dataclass_fields__)[:3] == ["relative_path", "offset", "length"],
        f"_StorageInfo fields {list(filesystem._StorageInfo.__dataclass_fields__)}",
    )
    _require(
        _params(utils._create_file_view) == ["file", "offset", "length"],
        f"_create_file_view{inspect.signature(utils._create_file_view)}",
    )
    _require(filesystem.DEFAULT_SUFFIX == ".distcp", f"DEFAULT_SUFFIX is {filesystem.DEFAULT_SUFFIX!r}")
    writer_params = _params(filesystem.FileSystemWriter.__init__)
    for name in ("single_file_per_rank", "sync_files", "thread_count"):
        _require(name in writer_params, f"FileSystemWriter({name}=) is gone")
    from torch.distributed.checkpoint import planner_helpers

    source = inspect.getsource(planner_helpers) + inspect.getsource(utils)
    for hook in ("__create_write_items__", "__create_chunk_list__", "__get_tensor_shard__"):
        _require(hook in source, f"DCP no longer calls {hook} (the _Checkpointable protocol _LazyShards implements)")


@_workaround(
    "torch_save_record_layout",
    "torch.save of one contiguous tensor: a zip with one uncompressed '<name>/data/0' entry holding "
    "its bytes (bytecopy.dcp_records.record_data_offset finds them); under serialization.skip_data() it "
    "seeks forward once over exactly those bytes (bytecopy.dcp_records.HoleFillingStream fills the hole)",
    "nothing (torch 2.11 and 2.13 alike)",
)
def _check_torch_save_layout():
    import struct

    import torch

    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    record = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    data = [i for i in record.infolist() if i.filename.split("/")[-2:-1] == ["data"]]
    _require(len(data) == 1 and data[0].compress_type == zipfile.ZIP_STORED, f"data entries {data}")
    header = buffer.getvalue()[data[0].header_offset : data[0].header_offset + 30]
    _require(header[:4] == b"PK\x03\x04", "no zip local header before the tensor bytes")
    start = data[0].header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
    _require(
        buffer.getvalue()[start : start + tensor.nbytes] == tensor.numpy().tobytes(),
        "the tensor bytes are not where the zip local header says",
    )

    seeks = []

    class Recorder(io.BytesIO):
        def seek(self, offset, whence=io.SEEK_SET):
            seeks.append((offset, whence))
            return super().seek(offset, whence)

    with torch.serialization.skip_data():
        torch.save(torch.empty(3, 4), Recorder())
    forward = [s for s in seeks if s[1] == io.SEEK_CUR and s[0] > 0]
    _require(
        forward == [(tensor.nbytes, io.SEEK_CUR)],
        f"torch.save under skip_data seeked {seeks}, expected one forward seek of {tensor.nbytes}",
    )
    _require(
        callable(torch.serialization.get_crc32_options) and callable(torch.serialization.set_crc32_options),
        "torch.serialization.get/set_crc32_options are gone",
    )


# ---- optimizer state: initialisation before a load, Adam steps after it ---------------------


def init_optimizer_states_with_dummy_values(optimizer) -> None:
    """megatron-core's own dummy step that gives every torch Adam state its tensors (private).

    Without TE/apex fused Adam, the distributed optimizer can describe its state (and so load it)
    only once a step has created it."""
    optimizer._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Set torch Adam's per-parameter `step` to the checkpoint's.

    megatron-core's dp_reshardable load copies the per-parameter state tensors back after
    `load_state_dict` has set `step` from the saved param groups, and the copied `step` is the
    one of the dummy initialisation step (1), which would restart Adam's bias correction."""
    import torch

    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    states = (
        [loaded_optimizer_state] if len(optimizers) == 1 else [v for _, v in sorted(loaded_optimizer_state.items())]
    )
    for opt, state in zip(optimizers, states, strict=True):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue  # fused (TE/apex) Adam keeps its step in the param groups, already loaded
        step = float(steps.pop())
        for value in opt.optimizer.state.values():
            if "step" in value:
                value["step"] = torch.tensor(step)


def align_saved_schedule_values(optimizer, loaded_optimizer_state) -> None:
    """Give the checkpoint's param groups this run's `max_lr` / `min_lr` before they are loaded.

    megatron-core 0.19's distributed optimizer pairs each current param group with a saved one by a
    tuple of group settings that includes `max_lr` and `min_lr` (0.16 pairs them by position), so a
    resume that changes `train.lr` / `train.min_lr` failed with a KeyError of that tuple. The values
    are the LR schedule's, which a resumed run takes from its own config anyway (the scheduler is
    overridden), so the saved ones are replaced only where every current group of an optimizer
    shares one value (megadiff sets no per-group learning rates)."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    states = (
        [loaded_optimizer_state] if len(optimizers) == 1 else [v for _, v in sorted(loaded_optimizer_state.items())]
    )
    for opt, state in zip(optimizers, states, strict=True):
        for key in ("max_lr", "min_lr"):
            current = {g.get(key) for g in opt.optimizer.param_groups}
            if len(current) != 1:
                continue
            value = current.pop()
            for group in state["optimizer"]["param_groups"]:
                if key in group:
                    group[key] = value


@_workaround(
    "optimizer_state_init_and_adam_steps",
    "DistributedOptimizer._init_optimizer_states_with_dummy_values() (no arguments); torch Adam keeps "
    "a per-parameter tensor state['step']; the loaded param groups carry 'step'",
    "nothing seen: bit-exact resume passes on both with both workarounds (whether 0.19's load still "
    "needs restore_adam_steps was not re-tested; it is a no-op where the steps already agree)",
)
def _check_optimizer_state():
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = getattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values", None)
    _require(init is not None, "DistributedOptimizer._init_optimizer_states_with_dummy_values is gone")
    _require(_params(init) == ["self"], f"_init_optimizer_states_with_dummy_values{inspect.signature(init)}")
    param = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([param])
    param.grad = torch.ones(2)
    adam.step()
    step = adam.state[param].get("step")
    _require(isinstance(step, torch.Tensor), f"torch Adam's state['step'] is {type(step).__name__}, not a tensor")


# ---- megatron-core on CPU and on CUDA without Transformer Engine ---------------------------


def define_te_general_gemm_without_te() -> None:
    """megatron-core 0.16 imports `te_general_gemm` from its TE extension only when TE imports,
    and the router then reads the undefined global (NameError) on CPU and on CUDA without TE.
    0.19 defines it as None itself; this defines the same where it is missing."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@_workaround(
    "moe_utils_te_general_gemm",
    "megatron.core.transformer.moe.moe_utils reads the module global te_general_gemm (None = no TE)",
    "0.16.1 leaves it undefined without TE (the workaround defines it); 0.19.x defines it as None",
)
def _check_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    members = list(vars(moe_utils).values())
    members += [m for c in members if inspect.isclass(c) for m in vars(c).values()]  # e.g. autograd forward
    functions = [inspect.unwrap(getattr(m, "__func__", m)) for m in members]
    users = [
        f
        for f in functions
        if inspect.isfunction(f) and f.__module__ == moe_utils.__name__ and "te_general_gemm" in _global_names(f)
    ]
    _require(users, "moe_utils no longer reads te_general_gemm: the workaround can go")
    define_te_general_gemm_without_te()
    _require(hasattr(moe_utils, "te_general_gemm"), "te_general_gemm still undefined")


def use_cpu_rng_in_tracker() -> None:
    """megatron-core's RNG tracker forks CUDA generator states; on CPU it forks the CPU's."""
    import torch
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


@_workaround(
    "rng_tracker_cpu_states",
    "tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state, read as module globals by CudaRNGStatesTracker",
    "nothing (0.19 added parameters; the replacements take *args, **kwargs)",
)
def _check_rng_tracker():
    from megatron.core.tensor_parallel import random as mcore_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        _require(hasattr(mcore_random, name), f"tensor_parallel.random.{name} is gone")
    tracker = mcore_random.CudaRNGStatesTracker
    used = set().union(*(_global_names(f) for f in vars(tracker).values() if inspect.isfunction(f)))
    _require(
        {"_get_cuda_rng_state", "_set_cuda_rng_state"} <= used,
        f"CudaRNGStatesTracker no longer calls _get/_set_cuda_rng_state (uses {sorted(used)[:20]})",
    )


def _l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron-core's `multi_tensor_l2norm` interface, computed on the tensors' device:
    (the 2-norm of every tensor of `tensor_lists` together, as a [1] fp32 tensor, None)."""
    import torch

    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    norms = torch._foreach_norm(tensors)  # one fused kernel per group on CUDA; per tensor on CPU
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def grad_norm_on_device_without_apex() -> None:
    """Without Transformer Engine and apex, megatron-core's gradient clipping falls back to
    `local_multi_tensor_l2_norm`, which builds `torch.tensor([norm, ...])` of every gradient's
    norm and `float()`s the result: one host read per gradient tensor and one more (each a wait for
    the GPU on CUDA), all in the optimizer step. The same norm computed on the device leaves
    `get_grad_norm_fp32`'s one `.item()` as the step's only read. Same values: per-tensor
    2-norms, then the 2-norm of those (on the CPU, bit for bit)."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm_on_device


@_workaround(
    "grad_norm_on_device_without_apex",
    "megatron.core.optimizer.clip_grads.l2_norm_impl (a module global, megatron.core.utils."
    "local_multi_tensor_l2_norm without TE and apex) called through multi_tensor_applier(op, "
    "noop_flag, [grads], False) by get_grad_norm_fp32",
    "nothing (0.16.1 and 0.19.2 alike)",
)
def _check_grad_norm_fallback():
    import torch
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    _require(hasattr(clip_grads, "l2_norm_impl"), "clip_grads.l2_norm_impl is gone")
    _require(hasattr(mcore_utils, "local_multi_tensor_l2_norm"), "utils.local_multi_tensor_l2_norm is gone")
    _require("l2_norm_impl" in _global_names(clip_grads.get_grad_norm_fp32), "get_grad_norm_fp32 no longer uses it")
    grads = [torch.arange(6.0).view(2, 3), torch.ones(4)]
    ours, _ = _l2_norm_on_device(2048, None, [grads], False)
    _require(ours.shape == (1,) and ours.dtype == torch.float32, f"norm {tuple(ours.shape)} {ours.dtype}")
    _require(torch.equal(ours, torch.tensor([float(torch.cat([g.flatten() for g in grads]).norm())])), "wrong norm")


_GPTMODEL_DEPRECATION = "GPTModel IS DEPRECATED"


class _DropGPTModelDeprecation(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith(_GPTMODEL_DEPRECATION)


def silence_gptmodel_deprecation() -> None:
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED" for every model chunk on rank 0. megadiff
    builds on GPTModel deliberately (its position-id RoPE path; see README "Moving to HybridModel"),
    so the warning says nothing a user can act on. Idempotent."""
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTModelDeprecation) for f in logger.filters):
        logger.addFilter(_DropGPTModelDeprecation())


@_workaround(
    "gptmodel_deprecation_log_silenced",
    "GPTModel logs its deprecation through the logger 'megatron.core.models.gpt.gpt_model' with a "
    "message starting 'GPTModel IS DEPRECATED'",
    "0.19 added the warning (0.16.1 has none: nothing to silence)",
)
def _check_gptmodel_deprecation():
    from megatron.core.models.gpt import gpt_model

    source = inspect.getsource(gpt_model)
    if "DEPRECATED" not in source:
        return  # megatron-core <= 0.16: nothing to silence
    _require(_GPTMODEL_DEPRECATION in source, "GPTModel's deprecation message changed: update the filter")
    _require(gpt_model.logger.name == "megatron.core.models.gpt.gpt_model", f"logger {gpt_model.logger.name}")


# ---- torch: torch-function modes around the CPU flex-attention kernels ----------------------


@contextlib.contextmanager
def without_torch_function_modes():
    """Run a block with every active TorchFunctionMode popped (private torch.overrides API):
    compiled flex needs none, and dynamo would otherwise trace megadiff.platform.cpu's CUDA->CPU
    mode too; the CPU flex backward is plain tensor code that need not pay per-op mode dispatch."""
    import torch

    popped = []
    try:
        while torch.overrides._is_torch_function_mode_enabled():
            popped.append(torch.overrides._pop_mode())
        yield
    finally:
        for mode in reversed(popped):
            torch.overrides._push_mode(mode)


@_workaround(
    "torch_function_modes_popped_for_flex",
    "torch.overrides._is_torch_function_mode_enabled(), _pop_mode(), _push_mode(mode)",
    "nothing (torch 2.11 and 2.13 alike)",
)
def _check_torch_function_modes():
    import torch
    from torch.overrides import TorchFunctionMode

    class Marker(TorchFunctionMode):
        pass

    with Marker():
        _require(torch.overrides._is_torch_function_mode_enabled(), "_is_torch_function_mode_enabled() is False")
        with without_torch_function_modes():
            _require(not torch.overrides._is_torch_function_mode_enabled(), "a mode is still active")
        _require(torch.overrides._is_torch_function_mode_enabled(), "the popped mode was not pushed back")


def flex_compile_errors() -> tuple:
    """The (private) exception types torch raises when it cannot compile flex on this machine
    (e.g. no C++ compiler): megadiff's CPU flex then falls back to eager flex."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (
        torch._dynamo.exc.BackendCompilerFailed,
        torch._inductor.exc.InductorError,
        torch._inductor.exc.CppCompileError,
    )


@_workaround(
    "cpu_flex_attention_backward",
    "torch's CPU flex_attention has no backward, so megadiff's _CpuFlexAttention recomputes it tile "
    "by tile from the BlockMask's kv_num_blocks / kv_indices / full_kv_num_blocks / full_kv_indices "
    "/ BLOCK_SIZE / mask_mod; compile failures are torch._dynamo / torch._inductor exception types",
    "nothing (torch 2.11 and 2.13 alike)",
)
def _check_cpu_flex_backward():
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    flex_compile_errors()
    mask = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 256, 256, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "BLOCK_SIZE", "mask_mod"):
        _require(hasattr(mask, name), f"BlockMask.{name} is gone")
    _require(tuple(mask.BLOCK_SIZE) == (128, 128), f"BlockMask.BLOCK_SIZE is {mask.BLOCK_SIZE}")
    _require(
        mask.kv_num_blocks.shape == (1, 1, 2) and mask.kv_indices.dtype == torch.int32,
        f"BlockMask.kv_num_blocks {tuple(mask.kv_num_blocks.shape)}, kv_indices {mask.kv_indices.dtype}",
    )
