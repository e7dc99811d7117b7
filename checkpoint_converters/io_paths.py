"""Which I/O path a converter takes (the tools' `--io`).

- "plain" (the default): tensors read with safetensors' `safe_open` / torch DCP's `load`, written
  with torch DCP's `FileSystemWriter` (megatron checkpoints) or appended to safetensors shards
  with ordinary writes (safetensors_stream.PlainFiles). Public APIs and file formats only; memory
  one tensor (or one read group); a dist checkpoint written this way has one file per tensor.
- "fast": the byte-copy engine (megadiff.checkpoint.bytecopy): bytes that need no computing are
  copied file to file with O_DIRECT and read-ahead threads ("direct"), or with copy_file_range
  ("page-cache"); the torch.save records are written and parsed by hand through private torch
  DCP APIs; one dist-checkpoint file per rank, as megatron-core writes. "fast" is "direct" where
  the checks of those private APIs pass on the installed stack (megadiff.platform.compat), else
  "plain", with a note. "auto" is the earlier name of "fast".

Why "plain" by default although the engine is faster (benchmarks/RESULTS.md, convert: mcore->hf
about 2x, hf->mcore about 1.3x wall on the 2-core VM): the plain path depends on nothing private,
and both paths are bit-equal on both tested stacks (tests/converters compare every round trip
through both), so the engine is a choice for large checkpoints, not a requirement.
"""

from collections.abc import Callable

IO_CHOICES = ("plain", "fast", "direct", "page-cache", "auto")
IO_HELP = (
    "how tensors are read and written: plain (default) = safetensors' safe_open, torch DCP's public "
    "save/load and ordinary file writes (one tensor in memory; one checkpoint file per tensor); fast = the "
    "byte-copy engine (bytes that need no computing copied file to file, O_DIRECT) where its checks of "
    "private torch APIs pass on this stack, else plain; direct / page-cache = the engine with O_DIRECT / "
    "copy_file_range; auto = fast"
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
    """'plain', 'direct' or 'page-cache' for a requested `io_mode` (one of IO_CHOICES; "fast" and
    "auto": the engine where its checks pass)."""
    if io_mode not in IO_CHOICES:
        raise ValueError(f"io mode must be one of {', '.join(IO_CHOICES)}, not {io_mode!r}")
    if io_mode not in ("auto", "fast"):
        return io_mode
    problem = engine_problem()
    if problem is not None:
        log(f"note: the byte-copy engine does not fit this torch ({problem}); using --io plain")
        return "plain"
    return "direct"
