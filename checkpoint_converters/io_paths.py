"""Which I/O path a converter takes (the tools' `--io`).

- "plain": tensors read with safetensors' `safe_open` / torch DCP's `load`, written with torch DCP's
  `FileSystemWriter` / safetensors' `save_file`. Public APIs only; memory one tensor (hf->mcore)
  or one output shard (mcore->hf); a dist checkpoint written this way has one file per tensor.
- "direct" / "page-cache": the byte-copy engine (megadiff.checkpoint.bytecopy): bytes that need no
  computing are copied file to file, with O_DIRECT and read-ahead threads or with
  copy_file_range; the torch.save records are written and parsed by hand through private torch
  DCP APIs. Memory one tensor; one dist-checkpoint file per rank, as megatron-core writes.
- "auto" (the default): the engine ("direct") where the checks of the private torch APIs it
  relies on pass on the installed stack (megadiff.platform.compat), else "plain", with a note.

Why "auto" and not "plain" by default: both paths are bit-equal on both tested stacks (torch
2.13 + megatron-core 0.16.1, torch 2.11 + megatron-core 0.19.2; tests/converters compare every
round trip through both), the private torch APIs the engine uses are the same in both releases,
and the plain path's one file per tensor (tens of thousands for LLaDA2-flash) and slower copies
(benchmarks/RESULTS.md, convert) make it the worse default. A torch release that changes those
APIs fails the compat checks, and "auto" then takes the plain path instead of writing bad bytes.
"""

from collections.abc import Callable

IO_CHOICES = ("plain", "fast", "direct", "page-cache", "auto")
IO_HELP = (
    "how tensors are read and written: plain = safetensors' safe_open/save_file and torch DCP's "
    "public save/load (one tensor, or one output shard, in memory; one checkpoint file per tensor); "
    "direct = the byte-copy engine with O_DIRECT reads and writes, bypassing the page cache (falls "
    "back per file where refused); page-cache = the engine with copy_file_range; auto (default) = "
    "direct where the engine's checks of private torch APIs pass on this stack, else plain"
)
ENGINE_WORKAROUNDS = ("torch_dcp_writer_internals", "torch_save_record_layout")


def engine_problem() -> str | None:
    """Why the byte-copy engine cannot be used with the installed torch, or None."""
    from megadiff.platform.compat import WORKAROUNDS, CompatError

    for workaround in WORKAROUNDS:
        if workaround.name in ENGINE_WORKAROUNDS:
            try:
                workaround.check()
            except CompatError as e:
                return f"{workaround.name}: {e}"
    return None


def resolve_io(io_mode: str, log: Callable[[str], None] = print) -> str:
    """'plain', 'direct' or 'page-cache' for a requested `io_mode` (one of IO_CHOICES)."""
    if io_mode not in IO_CHOICES:
        raise ValueError(f"io mode must be one of {', '.join(IO_CHOICES)}, not {io_mode!r}")
    if io_mode not in ("auto", "fast"):
        return io_mode
    problem = engine_problem()
    if problem is not None:
        log(f"note: the byte-copy engine does not fit this torch ({problem}); using --io plain")
        return "plain"
    return "direct"
