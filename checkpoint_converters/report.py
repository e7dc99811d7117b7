"""The one line every converter ends its data phase with (benchmarks/convert.py parses it)."""


def data_phase_line(nbytes: int, seconds: float, what: str = "wrote", copier=None) -> str:
    """'data: wrote X GB in Y s (Z GB/s)' and, given the SpanCopier, how the bytes were copied."""
    line = f"data: {what} {nbytes / 1e9:.2f} GB in {seconds:.1f} s ({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    if copier is not None:
        line += (
            f"; weight bytes copied: {copier.direct_bytes / 1e9:.2f} GB with direct I/O, "
            f"{copier.kernel_bytes / 1e9:.2f} GB in the kernel, {copier.buffered_bytes / 1e9:.2f} GB through a buffer"
        )
    return line
