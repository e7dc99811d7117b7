"""What a torchrun job prints: third-party warnings once, from rank 0, one line each.

Every process of a run imports megatron-core, torch and transformers, and each prints the same
warnings (Apex missing, deprecations), several processes interleaved, each in Python's two-line
form: the message, then the source line that raised it (`  warnings.warn(`, `  return func(*args,
**kwargs)`), which reads as a stray fragment in a log. So (unless the user chose filters with -W or
PYTHONWARNINGS) every process but rank 0 drops warnings and library log records below ERROR, and
rank 0 shows each distinct warning once, on one line that names where it came from.
"""

import logging
import os
import sys
import warnings


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """warnings.formatwarning without the source line, the message's whitespace folded to one line."""
    return f"{filename}:{lineno}: {category.__name__}: {' '.join(str(message).split())}\n"


def warnings_from_rank0_only(rank: int | None = None) -> None:
    """Set up this process's warnings and library logs as the module docstring says. Call it first
    in a torchrun entry point (before megatron-core, torch.distributed or transformers warn);
    `rank` defaults to the RANK environment variable (0 outside torchrun)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if sys.warnoptions:  # the user's -W / PYTHONWARNINGS choice wins
        return
    if rank != 0:
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers configures its logger
        logging.getLogger().setLevel(logging.ERROR)  # megatron-core logs through the root logger's level
        return
    # After Python's default filters (which hide DeprecationWarning outside __main__): what they
    # show, show once per distinct message, whichever module raises it again.
    warnings.filterwarnings("once", append=True)
    warnings.formatwarning = one_line_warning
