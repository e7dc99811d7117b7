"""megatron-core's compiled dataset helpers (`megatron.core.datasets.helpers_cpp`), in NumPy where the
compiled module is missing.

GPTDataset builds its sample index with `build_sample_idx_int32/_int64` and BlendedDataset its blend with
`build_blending_indices` (or `build_exhaustive_blending_indices`), all from helpers.cpp. Both tested
wheels ship the module compiled (megatron-core 0.16.1 for cp311 and 0.19.2 for cp312; helpers.cpp is
the same file in both), and then nothing here is used. A source install, or a wheel for another
Python, may lack it: megatron-core would fail at the first dataset build and Megatron-LM would run
`make` (a C++ compiler and pybind11) on the fly. `ensure_dataset_helpers()` registers these NumPy
versions under the module's name instead, with a note. Same arguments, same results
(tests/platform/test_dataset_helpers.py compares them with the compiled ones on both stacks); they
loop in Python, about a second per million samples, which only the index build (once per dataset,
then cached) pays.
"""

import importlib.util
import sys
import types

import numpy

MODULE = "megatron.core.datasets.helpers_cpp"


def build_sample_idx(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence=True,
                     add_extra_token_to_sequence=1, dtype=numpy.int64):  # fmt: skip
    """[num_samples + 1, 2]: (index into document_idx, offset in that document) where each sample
    starts (helpers.cpp build_sample_idx)."""
    total = num_epochs * tokens_per_epoch - add_extra_token_to_sequence
    num_samples = total // seq_length if drop_last_partial_sequence else -(-total // seq_length)
    out = numpy.zeros((num_samples + 1, 2), dtype=dtype)
    doc, offset, last = 0, 0, len(document_idx) - 1
    for sample in range(1, num_samples + 1):
        remaining = seq_length + add_extra_token_to_sequence
        while remaining != 0:
            length = int(sizes[document_idx[doc]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - add_extra_token_to_sequence
                remaining = 0
            elif doc == last:  # the data ends inside this (last, partial) sample
                offset = int(sizes[document_idx[doc]]) - add_extra_token_to_sequence
                break
            else:
                doc, offset = doc + 1, 0
        out[sample] = (doc, offset)
    return out


def build_sample_idx_int32(*args):
    return build_sample_idx(*args, dtype=numpy.int32)


def build_sample_idx_int64(*args):
    return build_sample_idx(*args, dtype=numpy.int64)


def build_blending_indices(dataset_index, dataset_sample_index, weights, num_datasets, size, verbose=False):
    """Fill the two arrays in place: sample i comes from the dataset furthest behind its weight
    (helpers.cpp build_blending_indices; the first one on ties)."""
    weights = numpy.asarray(weights, dtype=numpy.float64)
    counts = numpy.zeros(num_datasets, dtype=numpy.int64)
    for i in range(size):
        errors = weights * max(float(i), 1.0) - counts
        best = int(numpy.argmax(errors))
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1


def build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, num_datasets):
    """Fill the arrays with exactly sizes[d] samples of each dataset d, interleaved by weight
    (helpers.cpp build_exhaustive_blending_indices)."""
    sizes = numpy.asarray(sizes, dtype=numpy.int64)
    weights = sizes / float(sizes.sum())
    counts = numpy.zeros(num_datasets, dtype=numpy.int64)
    unspent = [d for d in range(num_datasets) if sizes[d] > 0]
    i = 0
    while unspent:
        errors = [weights[d] * max(float(i), 1.0) - counts[d] for d in unspent]
        best = unspent[int(numpy.argmax(errors))]
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        i += 1


def numpy_helpers_module() -> types.ModuleType:
    module = types.ModuleType(MODULE, "NumPy stand-in for megatron-core's compiled dataset helpers (megadiff)")
    for name in ("build_sample_idx_int32", "build_sample_idx_int64", "build_blending_indices",
                 "build_exhaustive_blending_indices"):  # fmt: skip
        setattr(module, name, globals()[name])
    return module


def ensure_dataset_helpers(log=print) -> str:
    """'compiled' when megatron-core's module is there; else register the NumPy stand-in ('numpy')."""
    if MODULE in sys.modules or importlib.util.find_spec(MODULE) is not None:
        return "compiled"
    sys.modules[MODULE] = numpy_helpers_module()
    log(f"note: {MODULE} (megatron-core's compiled dataset helpers) is missing; building dataset indices in NumPy")
    return "numpy"
