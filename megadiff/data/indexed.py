"""Megatron indexed datasets (PREFIX.bin + PREFIX.idx) as training input, checked before any model
is built: the blend, the split, and each dataset's files.

- `parse_blend(data.blend)`: `[PREFIX, ...]` or `[W1, PREFIX1, W2, PREFIX2, ...]`, as Megatron-LM's
  --data-path takes them; returns megatron-core's (prefixes, weights or None) blend.
- `parse_split("98,2,0")`: Megatron-LM's --split (train, valid, test shares of each dataset).
- `check_indexed_dataset(prefix, vocab_size)`: both files there, the .idx readable by megatron-core's
  IndexedDataset, the .bin exactly as long as the index says, and every token id below the vocabulary.
  That last check reads the whole .bin once (chunk by chunk); its result is kept in the run's index
  cache dir, keyed by the file's path, size and modification time, so a relaunch does not read it again.
"""

import json
import os

import numpy

from megadiff.data.rows import DataError

SCAN_CHUNK_TOKENS = 1 << 26  # tokens per read while looking for the largest id (256 MiB of int32)
TOKEN_CHECKS_NAME = "megadiff_token_checks.json"


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_blend(blend: list) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights or None) from data.blend; raises DataError naming data.blend."""
    if not isinstance(blend, list) or not blend:
        raise DataError(f"data.blend must be a non-empty list of prefixes or of weight, prefix pairs, got {blend!r}")
    numbers = [_number(v) for v in blend]
    if all(n is None for n in numbers):
        return [str(p) for p in blend], None
    if len(blend) % 2:
        raise DataError(
            f"data.blend has {len(blend)} entries with weights among them; a weighted blend is pairs "
            f"[W1, PREFIX1, W2, PREFIX2, ...] (or list prefixes only)"
        )
    weights, prefixes = numbers[0::2], blend[1::2]
    for i, (w, p) in enumerate(zip(weights, prefixes, strict=True)):
        if w is None:
            raise DataError(
                f"data.blend[{2 * i}]={blend[2 * i]!r} is not a weight; a weighted blend is [W1, PREFIX1, ...]"
            )
        if _number(p) is not None:
            raise DataError(f"data.blend[{2 * i + 1}]={p!r} is a number where a dataset prefix belongs")
        if not w > 0 or w != w or w == float("inf"):
            raise DataError(f"data.blend[{2 * i}]: weight {blend[2 * i]!r} of {p} must be a finite number > 0")
    return [str(p) for p in prefixes], weights


def parse_split(split: str) -> list[float]:
    """The three train/valid/test shares of data.split ("98,2,0"; fewer parts mean 0 for the rest)."""
    parts = [s.strip() for s in str(split).replace("/", ",").split(",")]
    values = [_number(s) for s in parts]
    if not 1 <= len(parts) <= 3 or any(v is None or v < 0 or v != v for v in values) or sum(values) <= 0:
        raise DataError(
            f"data.split={split!r}: expected up to three non-negative shares 'train,valid,test', e.g. 98,2,0"
        )
    return values + [0.0] * (3 - len(values))


def _index_problem(prefix: str):
    """(the dataset, None) when megatron-core's IndexedDataset reads PREFIX.idx; else (None, why)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        return IndexedDataset(prefix, mmap=False), None
    except (AssertionError, ValueError, OSError, KeyError) as e:  # bad header / version / dtype code / size
        return None, f"{type(e).__name__}: {e}".strip()


def check_indexed_dataset(prefix: str, vocab_size: int, cache_dir: str | None = None, log=print) -> dict:
    """Check one dataset of the blend (module docstring); raises DataError naming the file. Returns
    {documents, sequences, tokens, dtype, max_token_id}."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing (data.blend names {prefix}; a dataset is PREFIX.bin + PREFIX.idx)")
    dataset, why = _index_problem(prefix)
    if dataset is None:
        raise DataError(f"{idx}: not a Megatron index file megatron-core can read ({why}); re-run the preprocessing")
    lengths = numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64)
    dtype = numpy.dtype(dataset.index.dtype)
    tokens = int(lengths.sum())
    want, have = tokens * dtype.itemsize, os.path.getsize(bin_)
    if have != want:
        raise DataError(
            f"{bin_}: {have} bytes, but {idx} indexes {tokens} {dtype.name} tokens ({want} bytes); the .bin and "
            f".idx are not one pair (a copy cut short, or files of two preprocessing runs)"
        )
    top = max_token_id(bin_, dtype, cache_dir, log)
    if top is not None and top >= vocab_size:
        raise DataError(
            f"{bin_}: holds token id {top}, but the model's vocabulary has {vocab_size} ids (config.json "
            f"vocab_size); the data was tokenized with another tokenizer"
        )
    return {
        "documents": len(dataset.document_indices) - 1,
        "sequences": len(lengths),
        "tokens": tokens,
        "dtype": dtype.name,
        "max_token_id": top,
    }


def _file_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def max_token_id(bin_path: str, dtype, cache_dir: str | None = None, log=print) -> int | None:
    """The largest token id in BIN_PATH (None when empty); negative ids (a corrupt int32 file) are
    reported as an error. Read once per file version (see the module docstring)."""
    records = {}
    cache = os.path.join(cache_dir, TOKEN_CHECKS_NAME) if cache_dir else None
    if cache and os.path.isfile(cache):
        try:
            with open(cache) as f:
                records = json.load(f)
        except (OSError, ValueError):
            records = {}
    key = _file_key(bin_path)
    if key in records:
        return records[key]
    data = numpy.memmap(bin_path, dtype=dtype, mode="r") if os.path.getsize(bin_path) else numpy.zeros(0, dtype)
    if data.size > SCAN_CHUNK_TOKENS:
        log(f"checking the token ids of {bin_path} ({data.nbytes / 2**30:.1f} GiB; once per file)")
    top, low = None, None
    for start in range(0, data.size, SCAN_CHUNK_TOKENS):
        chunk = data[start : start + SCAN_CHUNK_TOKENS]
        top = int(chunk.max()) if top is None else max(top, int(chunk.max()))
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
    del data
    if low is not None and low < 0:
        raise DataError(f"{bin_path}: holds a negative token id ({low}); the file is not a token file")
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        records[key] = top
        tmp = f"{cache}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, cache)
    return top
