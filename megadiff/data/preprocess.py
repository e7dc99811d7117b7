"""Raw text (.jsonl / .parquet) -> Megatron indexed datasets (PREFIX.bin + PREFIX.idx), as Megatron-LM's
tools/preprocess_data.py writes them, with the model's Hugging Face tokenizer.

Each document (one row's text field) becomes the tokenizer's ids of its text as plain text (special
token strings inside it are spelled out, never parsed: megadiff.data.tokenize.encode_text) plus, with
`append_eod`, the tokenizer's EOS as end-of-document token; that EOD is what training later splits
samples into documents by. Files are written by megatron-core's own IndexedDatasetBuilder: uint16
tokens for vocabularies under 65 500 ids, int32 above (megatron-core's DType.optimal_dtype), so
Megatron-LM reads them too. Rows are tokenized by `workers` processes in input order (the output does
not depend on the worker count); the main process writes. Outputs are written under temporary names
and renamed when complete, so an interrupted run leaves no PREFIX.bin / PREFIX.idx behind.
"""

import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megadiff.data.rows import DataError, list_data_files
from megadiff.data.tokenize import encode_text

ROWS_PER_TASK = 64  # rows a worker tokenizes per task: big enough to amortise the pickling


@dataclass
class PreprocessStats:
    files: int = 0
    rows: int = 0
    documents: int = 0  # per json key
    empty: int = 0  # rows whose text was empty (skipped, as Megatron-LM does)
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)


def output_prefixes(prefix: str, json_keys: list[str]) -> dict[str, str]:
    """PREFIX for one json key; Megatron-LM's PREFIX_{key}_document for each of several."""
    if len(json_keys) == 1:
        return {json_keys[0]: prefix}
    return {key: f"{prefix}_{key}_document" for key in json_keys}


def read_documents(paths: list[Path], json_keys: list[str]) -> Iterator[tuple[str, list[str]]]:
    """("file:line", [text of each json key]) for every row; a row without a key, or with a
    non-string value there, is an error naming its file and line."""
    for path in paths:
        if path.suffix == ".parquet":
            rows = _parquet_rows(path, json_keys)
        else:
            rows = _jsonl_rows(path)
        for line, row in rows:
            where = f"{path}:{line}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: row is a {type(row).__name__}, expected an object with {json_keys}")
            texts = []
            for key in json_keys:
                if key not in row:
                    raise DataError(f"{where}: no field '{key}' (--json-keys {' '.join(json_keys)})")
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: field '{key}' is a {type(row[key]).__name__}, expected text")
                texts.append(row[key])
            yield where, texts


def _jsonl_rows(path: Path):
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{line_no}: not a JSON line ({e})") from None


def _parquet_rows(path: Path, json_keys: list[str]):
    import pyarrow.parquet as pq  # optional (dev extra): only parquet inputs need it

    try:
        source = pq.ParquetFile(path)
        missing = [k for k in json_keys if k not in source.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: no column '{missing[0]}' (--json-keys {' '.join(json_keys)})")
        row_no = 0
        for batch in source.iter_batches(columns=json_keys, batch_size=1024):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: cannot read parquet file ({e})") from e


# ---- the workers: one tokenizer per process ---------------------------------------------------

_TOKENIZER = None
_EOD: int | None = None


def load_tokenizer(tokenizer_dir: str):
    """The HF tokenizer of TOKENIZER_DIR, never running (or offering to run) code from that dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)


def _init_worker(tokenizer_dir: str, eod: int | None) -> None:
    global _TOKENIZER, _EOD
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _TOKENIZER, _EOD = load_tokenizer(tokenizer_dir), eod


def encode_document(text: str, tokenizer, eod: int | None) -> list[int]:
    """The ids a document is stored as: its text's ids, plus EOD (None: no EOD)."""
    ids = encode_text(text, tokenizer) if text else []
    return ids + [eod] if ids and eod is not None else ids


def _encode_rows(texts_of_rows: list[list[str]]) -> list[list[list[int]]]:
    return [[encode_document(t, _TOKENIZER, _EOD) for t in texts] for texts in texts_of_rows]


def _tasks(documents, size: int):
    task = []
    for _, texts in documents:
        task.append(texts)
        if len(task) == size:
            yield task
            task = []
    if task:
        yield task


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_dir: str,
    json_keys: list[str] = ("text",),
    workers: int = 1,
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize every row of `inputs` into indexed datasets (module docstring); returns the stats."""
    import numpy

    with warnings.catch_warnings():  # megatron-core's import-time notes about TE/apex: not for this tool
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    json_keys = list(json_keys)
    paths = list_data_files(inputs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes; no fork warnings
    tokenizer = load_tokenizer(tokenizer_dir)
    eod = tokenizer.eos_token_id if append_eod else None
    if append_eod and eod is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no EOS token to end documents with; use --no-append-eod")
    dtype = DType.optimal_dtype(len(tokenizer))
    prefixes = output_prefixes(output_prefix, json_keys)
    resolved_inputs = {os.path.realpath(p) for p in paths}
    for prefix in prefixes.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.realpath(path) in resolved_inputs:
                raise DataError(f"{path}: is an input; choose another --output-prefix")
            if os.path.exists(path) and not overwrite:
                raise DataError(f"{path}: exists; pass --overwrite to replace it, or choose another --output-prefix")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    stats = PreprocessStats(files=len(paths))
    tmp = f".tmp-{os.getpid()}"
    builders = {key: IndexedDatasetBuilder(prefixes[key] + ".bin" + tmp, dtype=dtype) for key in json_keys}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="row", desc="preprocess", dynamic_ncols=True)
    started = time.perf_counter()
    pool = None
    try:
        documents = read_documents(paths, json_keys)
        tasks = _tasks(documents, ROWS_PER_TASK)
        if workers > 1:
            # forkserver: workers fork from a clean server that imported only this module, not from
            # this process (torch's threads: a fork of a threaded process can deadlock its children)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = context.Pool(workers, _init_worker, (tokenizer_dir, eod))
            encoded = pool.imap(_encode_rows, tasks)
        else:
            _init_worker(tokenizer_dir, eod)
            encoded = map(_encode_rows, tasks)
        for rows in encoded:
            for per_key in rows:
                stats.rows += 1
                for key, ids in zip(json_keys, per_key, strict=True):
                    if not ids:
                        stats.empty += 1
                        continue
                    builders[key].add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
                    stats.documents += 1
                    stats.tokens += len(ids)
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix_str(f"{stats.tokens} tokens", refresh=False)
        for key, builder in builders.items():
            builder.finalize(prefixes[key] + ".idx" + tmp)
        for key in json_keys:  # .bin first: a .idx appears only beside its finished .bin
            for ext in (".bin", ".idx"):
                os.replace(prefixes[key] + ext + tmp, prefixes[key] + ext)
                stats.bytes_written += os.path.getsize(prefixes[key] + ext)
                stats.outputs.append(prefixes[key] + ext)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
        for key in json_keys:
            for ext in (".bin", ".idx"):
                if os.path.exists(prefixes[key] + ext + tmp):
                    os.unlink(prefixes[key] + ext + tmp)
    stats.seconds = time.perf_counter() - started
    return stats
