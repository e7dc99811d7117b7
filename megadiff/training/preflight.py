"""Every output path of a training run is checked before anything is built or trained.

A run that trains for hours and then cannot write its checkpoint or its metrics file loses all of
it, so `check_outputs` (called first thing by the Trainer, on every rank) proves each output can be
written: it creates and deletes a probe file where the output will go (permission bits alone say
nothing for root or read-only mounts).
"""

import os
import tempfile

from megadiff.files.outputs import OutputPathError, check_output_file, refuse_overlaps
from megadiff.training.config import TrainingConfig, TrainingConfigError


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _probe(directory: str) -> str | None:
    """None when a file can be created in `directory`, else the OS's reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".megadiff-probe-", dir=directory)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(name)
    return None


def check_writable_dir(field: str, path: str) -> None:
    """`path` is a writable directory, or one that can be created (its nearest existing ancestor is
    a writable directory). Raises TrainingConfigError naming `field`."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainingConfigError(f"{field}={path}: exists and is not a directory; choose a directory")
    where = _existing_ancestor(path)
    if not os.path.isdir(where):
        raise TrainingConfigError(f"{field}={path}: cannot be created, {where} is a file, not a directory")
    reason = _probe(where)
    if reason:
        what = "not writable" if where == os.path.abspath(path) else f"cannot be created in {where}"
        raise TrainingConfigError(f"{field}={path}: {what} ({reason}); choose a writable location")


def check_writable_file(field: str, path: str) -> None:
    """`path` is a file that can be appended to, in an existing writable directory, and not a link
    or a second name of another file (megadiff.files.outputs.open_output refuses those)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise TrainingConfigError(f"{field}={path}: is a directory; name a file")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise TrainingConfigError(f"{field}={path}: directory {parent} does not exist; create it first")
    try:
        check_output_file(path, f"{field}=")  # not a link, nor a second name of another file
    except OutputPathError as e:
        raise TrainingConfigError(str(e).replace("= ", "=", 1)) from None
    reason = _probe(parent)
    if reason is None and os.path.exists(path):
        try:
            open(path, "a").close()
        except OSError as e:
            reason = e.strerror
    if reason:
        raise TrainingConfigError(f"{field}={path}: not writable ({reason})")


def check_outputs_spare_inputs(cfg: TrainingConfig) -> None:
    """No output of the run is one of its inputs or lies inside an input dir (megadiff.files.outputs):
    a metrics file inside the data dir would be read as training data by the next run, a save_dir
    that is model.init_from_mcore would be pruned. Raises TrainingConfigError naming both keys."""
    files = cfg.data.train_files if isinstance(cfg.data.train_files, list) else [cfg.data.train_files]
    inputs = [
        ("model.hf_dir", cfg.model.hf_dir),
        ("model.tokenizer_dir", cfg.model.tokenizer_dir),
        ("model.init_from_mcore", cfg.model.init_from_mcore),
        ("lora.init_from_peft", cfg.lora.init_from_peft),
    ] + [("data.train_files", f) for f in files if f]
    outputs = [
        ("checkpoint.save_dir", cfg.checkpoint.save_dir),
        ("logging.metrics_file", cfg.logging.metrics_file),
        ("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
    ]
    try:
        # a save_dir may hold the model (nothing but iter_* dirs is ever pruned), not the starting checkpoint
        refuse_overlaps(outputs, [i for i in inputs if i[0] != "model.init_from_mcore"], contains_ok=True)
        refuse_overlaps(outputs, [i for i in inputs if i[0] == "model.init_from_mcore"])
    except OutputPathError as e:
        raise TrainingConfigError(str(e)) from None


def check_outputs(cfg: TrainingConfig) -> None:
    """Checkpoint dir, metrics file, tensorboard dir and logging cadence, before any model exists."""
    check_outputs_spare_inputs(cfg)
    if cfg.checkpoint.save_dir:
        check_writable_dir("checkpoint.save_dir", cfg.checkpoint.save_dir)
    lg = cfg.logging
    if lg.metrics_file:
        check_writable_file("logging.metrics_file", lg.metrics_file)
    if lg.tensorboard_dir:
        check_writable_dir("logging.tensorboard_dir", lg.tensorboard_dir)
    if lg.log_interval < 1:
        raise TrainingConfigError(f"logging.log_interval must be >= 1 (steps between log lines), got {lg.log_interval}")
