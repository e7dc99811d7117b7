"""Converters copy tensor bytes file to file in the kernel where the output is input bytes in
another order, fall back to reading where it is not, and give the same bytes either way."""

import errno
import filecmp
import io
import os

import pytest
import torch

from checkpoint_converters import byte_spans
from checkpoint_converters.byte_spans import FileTable, Span, SpanCopier, Spans
from checkpoint_converters.hf_direct import DirectHFReader
from checkpoint_converters.hf_io import HFCheckpointReader
from checkpoint_converters.llada2_mapping import _qkv_hf_to_mcore
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from checkpoint_converters.moe import convert_expert_layout
from megadiff.checkpoint.lazy import _HoleFillingStream
from megadiff.checkpoint.reader import DistCheckpointReader
from tests.converters.test_moe_convertor import assert_same_checkpoint

QUIET = dict(progress=False, log=lambda *a: None)


def _write_tensor_file(path, tensor, lead=24):
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(b"x" * lead + data)
    return lead


def test_qkv_regroup_on_row_addresses_reads_back_the_regrouped_tensor(tmp_path):
    """The parameter table's transform run on row addresses = the transform run on the data."""
    w = torch.randn(4 * 2 + 2 * 2 * 2, 6)  # 4 q heads, 2 kv heads, head dim 2, hidden 6
    lead = _write_tensor_file(tmp_path / "w.bin", w)
    files = FileTable()
    rows = files.row_addresses(str(tmp_path / "w.bin"), lead, w.shape[0], 6 * 4)
    regrouped = _qkv_hf_to_mcore(rows, 4, 2, 2)
    spans = files.spans(regrouped, 6 * 4, tuple(w.shape), w.dtype)
    assert torch.equal(spans.read(), _qkv_hf_to_mcore(w, 4, 2, 2))
    assert len(spans.spans) == 6  # [q0 q1 | k0 | v0 | q2 q3 | k1 | v1]: adjacent rows joined
    assert files.spans(rows, 24, tuple(w.shape), w.dtype).spans == (Span(str(tmp_path / "w.bin"), lead, w.nbytes),)


def _count_kernel_bytes(monkeypatch):
    counted = {"kernel": 0}
    real = os.copy_file_range

    def copy_file_range(*args, **kwargs):
        n = real(*args, **kwargs)
        counted["kernel"] += n
        return n

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return counted


@pytest.mark.parametrize("kernel", [True, False])
def test_copier_writes_the_same_bytes_through_the_kernel_or_a_buffer(tmp_path, monkeypatch, kernel):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    if not kernel:
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(byte_spans, "_BUFFER_BYTES", 1000)  # several buffer rounds
    spans = [Span(str(src), 7, 5000), Span(str(src), 100000, 3), Span(str(src), 0, 0)]
    copier = SpanCopier()
    with open(tmp_path / "out.bin", "wb", buffering=0) as out:
        out.write(b"head")
        assert copier.copy(spans, out.fileno()) == 5003
        out.write(b"tail")
    copier.close()
    data = src.read_bytes()
    assert (tmp_path / "out.bin").read_bytes() == b"head" + data[7:5007] + data[100000:100003] + b"tail"
    assert (copier.kernel_bytes, copier.buffered_bytes) == ((5003, 0) if kernel else (0, 5003))


@pytest.mark.parametrize("kernel", [True, False])
def test_copier_refuses_a_source_that_ends_early(tmp_path, monkeypatch, kernel):
    src = tmp_path / "short.bin"
    src.write_bytes(b"0123456789")
    if not kernel:
        monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    with open(tmp_path / "out.bin", "wb", buffering=0) as out, pytest.raises(ValueError, match="short.bin: ends before byte 20"):
        SpanCopier().copy([Span(str(src), 5, 15)], out.fileno())
    with pytest.raises(ValueError, match="short.bin: ends before byte 20"):
        Spans((15,), torch.uint8, (Span(str(src), 5, 15),)).read()


def test_torch_save_record_with_its_data_hole_filled_loads_as_the_tensor(tmp_path):
    tensor = torch.randn(33, 7).to(torch.bfloat16)
    lead = _write_tensor_file(tmp_path / "src.bin", tensor)
    spans = Spans(tuple(tensor.shape), tensor.dtype, (Span(str(tmp_path / "src.bin"), lead, tensor.nbytes),))
    copier = SpanCopier()
    with open(tmp_path / "record.pt", "wb") as stream:
        def fill(n):
            assert n == tensor.nbytes
            stream.flush()
            end = stream.tell() + n
            copier.copy(spans.spans, stream.fileno())
            stream.seek(end)

        with torch.serialization.skip_data():
            torch.save(torch.empty(spans.shape, dtype=spans.dtype), _HoleFillingStream(stream, fill))
    loaded = torch.load(tmp_path / "record.pt", weights_only=True)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensor)
    with pytest.raises(io.UnsupportedOperation):  # a second hole is not what a one-tensor record has
        stream = _HoleFillingStream(io.BytesIO(), lambda n: None)
        stream.seek(8, io.SEEK_CUR)
        stream.seek(8, io.SEEK_CUR)


def _bytes_by_rank(hf_dir):
    reader = HFCheckpointReader(hf_dir)
    matrices = sum(reader.nbytes(n) for n in reader.names() if len(reader.shape(n)) >= 2)
    vectors = sum(reader.nbytes(n) for n in reader.names() if len(reader.shape(n)) < 2)
    return matrices, vectors


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_hf_to_mcore_copies_every_matrix_in_the_kernel_unless_the_dtype_changes(single_process_run, tiny_hf):
    matrices, vectors = _bytes_by_rank(tiny_hf)
    split, merged, to_bf16 = single_process_run["report"]["runs"]
    assert (split["kernel_bytes"], split["read_bytes"]) == (matrices, vectors)
    assert (merged["kernel_bytes"], merged["read_bytes"]) == (matrices, vectors)
    assert (to_bf16["kernel_bytes"], to_bf16["read_bytes"]) == (0, matrices + vectors)  # cast: read


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_fp32_input_converted_to_bf16_exports_the_rounded_weights(single_process_run, tiny_hf, tmp_path):
    out = convert_mcore_to_hf(single_process_run["ck111_to_bf16"], str(tmp_path / "hf"), **QUIET)
    original, exported = HFCheckpointReader(tiny_hf), HFCheckpointReader(out)
    assert original.names() == exported.names()
    for name in original.names():
        want = original.get(name) if name.endswith("expert_bias") else original.get(name).to(torch.bfloat16)
        got = exported.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_mcore_to_hf_at_111_copies_every_matrix_in_the_kernel(single_process_run, tiny_hf, tmp_path, monkeypatch):
    matrices, vectors = _bytes_by_rank(tiny_hf)
    counted = _count_kernel_bytes(monkeypatch)
    read_many = DistCheckpointReader.read_many
    read = {"bytes": 0}

    def counted_read_many(self, boxes):
        tensors = read_many(self, boxes)
        read["bytes"] += sum(t.nbytes for t in tensors)
        return tensors

    monkeypatch.setattr(DistCheckpointReader, "read_many", counted_read_many)
    out = convert_mcore_to_hf(single_process_run["ck111"], str(tmp_path / "hf"), max_shard_size="300KB", **QUIET)
    assert_same_checkpoint(tiny_hf, out)
    assert (counted["kernel"], read["bytes"]) == (matrices, vectors)


def test_merge_and_split_never_read_a_tensor(tiny_hf, tmp_path, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("a tensor was read into memory")

    monkeypatch.setattr(DirectHFReader, "_read", no_reads)
    counted = _count_kernel_bytes(monkeypatch)
    merged = convert_expert_layout(tiny_hf, str(tmp_path / "m"), "merge", **QUIET)
    split = convert_expert_layout(merged, str(tmp_path / "s"), "split", max_shard_size="200KB", **QUIET)
    assert_same_checkpoint(tiny_hf, split)
    matrices, vectors = _bytes_by_rank(tiny_hf)
    assert counted["kernel"] == 2 * (matrices + vectors)


def test_merge_without_kernel_copies_writes_identical_files(tiny_hf, tiny_hf_merged, tmp_path, monkeypatch):
    """Where copy_file_range is refused (other file systems, older kernels): same output."""
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
    out = convert_expert_layout(tiny_hf, str(tmp_path / "m"), "merge", **QUIET)
    shards = sorted(f for f in os.listdir(tiny_hf_merged) if f.endswith(".safetensors"))
    assert shards and shards == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    for name in shards + ["model.safetensors.index.json"]:
        assert filecmp.cmp(os.path.join(tiny_hf_merged, name), os.path.join(out, name), shallow=False), name


def test_read_ahead_yields_everything_in_order_and_asks_for_ranges_ahead(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(4000))
    items = [(f"t{i}", Spans((100,), torch.uint8, (Span(str(src), 100 * i, 100),))) for i in range(10)]
    items.insert(3, ("tensor", torch.zeros(50, dtype=torch.uint8)))
    asked = []

    class Recorder(SpanCopier):
        def read_ahead(self, spans):
            asked.extend(s.offset for s in spans)

    out = []
    for name, value in byte_spans.with_read_ahead(items, Recorder(), window_bytes=250):
        out.append(name)
        if name == "t0":  # by the time t0 is copied, the ranges up to ~250 bytes ahead were asked for
            assert asked == [0, 100, 200]
    assert out == [name for name, _ in items]
    assert asked == [100 * i for i in range(10)]
