"""The one base class of every error a user can fix by changing an input (a config key, a data row,
a file, a flag).

Such an error's message names the culprit (file and line, field, or flag) and says what to do, so the
tools print it as one line, without a traceback, and exit with status 2 (`USER_ERROR_EXIT`). Anything
else is a bug in megadiff and keeps its traceback.
"""

import os
import sys

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Bad input; the message names where it is and what to do (see the module docstring)."""


ERROR_FILE_ENV = "MEGADIFF_ERROR_FILE"


def note_error_line(line: str) -> None:
    """Append a worker's one-line error to $MEGADIFF_ERROR_FILE, where a launcher asked for it
    (examples/pretrain_llada2_sft.sh repeats the first one after torchrun's traceback)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:  # O_APPEND: lines from several ranks do not interleave
            f.write(line.replace("\n", " ") + "\n")
    except OSError:
        pass  # the error itself is on stderr already


def user_error_exit(error) -> int:
    """Print `error` as one line on stderr and return USER_ERROR_EXIT (for `return` or SystemExit).

    Under torchrun, before the process group exists every rank has read the same inputs and fails
    alike, so only rank 0 prints; once it exists each rank prints its own line, marked with its rank."""
    rank = int(os.environ.get("RANK", "0"))
    torch = sys.modules.get("torch")  # never import torch just to print an error
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        line = f"error (rank {rank}): {error}"
    else:
        line = f"error: {error}"
    if rank == 0 or line.startswith("error ("):
        print(line, file=sys.stderr, flush=True)
    note_error_line(line)  # every rank: torchrun may stop rank 0 before it gets there
    return USER_ERROR_EXIT


class CheckpointError(UserError):
    """A checkpoint directory or file (HF or megatron-core) is missing, inconsistent or corrupt."""


class ConfigError(UserError):
    """A model config field, or a parallel layout, that megadiff cannot run."""
