"""The NumPy stand-in for megatron-core's compiled dataset helpers gives the compiled module's results
(megadiff.platform.dataset_helpers), and is what megatron-core uses when the compiled one is missing."""

import sys

import numpy
import pytest

from megadiff.platform import dataset_helpers


@pytest.fixture(scope="module")
def compiled():
    return pytest.importorskip("megatron.core.datasets.helpers_cpp")


@pytest.mark.parametrize("extra, drop_last", [(0, True), (1, True), (0, False)])
def test_sample_index_matches_the_compiled_helper(compiled, extra, drop_last):
    rng = numpy.random.default_rng(extra + 2 * drop_last)
    sizes = rng.integers(1, 60, size=300).astype(numpy.int32)
    document_idx = numpy.concatenate([rng.permutation(300), rng.permutation(300)]).astype(numpy.int32)
    args = (sizes, document_idx, 32, 2, int(sizes.sum()), drop_last, extra)
    for name in ("build_sample_idx_int32", "build_sample_idx_int64"):
        want = getattr(compiled, name)(*args)
        got = getattr(dataset_helpers, name)(*args)
        assert got.dtype == want.dtype and numpy.array_equal(got, want), name


def test_blending_indices_match_the_compiled_helpers(compiled):
    weights = numpy.array([0.2, 0.5, 0.3])
    outs = []
    for module in (compiled, dataset_helpers):
        index, sample = numpy.zeros(5000, numpy.int16), numpy.zeros(5000, numpy.int64)
        module.build_blending_indices(index, sample, weights, 3, 5000, False)
        exhaustive = numpy.zeros(90, numpy.int16), numpy.zeros(90, numpy.int64)
        module.build_exhaustive_blending_indices(*exhaustive, numpy.array([40, 30, 20]), 3)
        outs.append((index, sample, *exhaustive))
    for want, got in zip(*outs, strict=True):
        assert numpy.array_equal(want, got)


def test_the_stand_in_is_registered_only_when_the_compiled_module_is_missing(monkeypatch):
    notes = []
    assert dataset_helpers.ensure_dataset_helpers(notes.append) == "compiled" and not notes
    monkeypatch.delitem(sys.modules, dataset_helpers.MODULE, raising=False)
    monkeypatch.setattr(dataset_helpers.importlib.util, "find_spec", lambda name: None)
    assert dataset_helpers.ensure_dataset_helpers(notes.append) == "numpy" and "missing" in notes[0]
    assert sys.modules[dataset_helpers.MODULE].build_blending_indices is dataset_helpers.build_blending_indices
