"""Converters copy tensor bytes as byte ranges of the input files where the output is input bytes
in another order (never making them tensors), read them where it is not (dtype casts, vectors),
and give the same bytes either way. The copy engines themselves: test_span_copy.py."""

import errno
import filecmp
import io
import os

import pytest
import torch

from checkpoint_converters.hf_direct import DirectHFReader
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from checkpoint_converters.moe import convert_expert_layout
from megadiff.checkpoint.bytecopy import byte_spans
from megadiff.checkpoint.bytecopy.byte_spans import FileTable, Span, Spans
from megadiff.checkpoint.bytecopy.dcp_records import HoleFillingStream
from megadiff.checkpoint.bytecopy.span_copy import SpanCopier
from megadiff.checkpoint.reader import DistCheckpointReader
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from megadiff.models.llada2.hf_mapping import _qkv_hf_to_mcore
from tests.converters.test_moe_convertor import assert_same_checkpoint
from tests.converters.test_span_copy import _direct_io_works

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


def test_torch_save_record_with_its_data_hole_filled_loads_as_the_tensor(tmp_path):
    tensor = torch.randn(33, 7).to(torch.bfloat16)
    lead = _write_tensor_file(tmp_path / "src.bin", tensor)
    spans = Spans(tuple(tensor.shape), tensor.dtype, (Span(str(tmp_path / "src.bin"), lead, tensor.nbytes),))
    copier = SpanCopier()
    stream = copier.create(str(tmp_path / "record.pt"))

    def fill(n):
        assert n == tensor.nbytes
        stream.copy(spans.spans)

    with torch.serialization.skip_data():
        torch.save(torch.empty(spans.shape, dtype=spans.dtype), HoleFillingStream(stream, fill))
    stream.close()
    copier.close()
    loaded = torch.load(tmp_path / "record.pt", weights_only=True)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, tensor)
    with pytest.raises(io.UnsupportedOperation):  # a second hole is not what a one-tensor record has
        stream = HoleFillingStream(io.BytesIO(), lambda n: None)
        stream.seek(8, io.SEEK_CUR)
        stream.seek(8, io.SEEK_CUR)


def _bytes_by_rank(hf_dir):
    reader = HFCheckpointReader(hf_dir)
    matrices = sum(reader.nbytes(n) for n in reader.names() if len(reader.shape(n)) >= 2)
    vectors = sum(reader.nbytes(n) for n in reader.names() if len(reader.shape(n)) < 2)
    return matrices, vectors


def _how(counts, prefix=""):
    """(bytes copied with direct I/O, bytes copied by the page-cache paths)."""
    return counts[f"{prefix}direct_bytes"], counts[f"{prefix}kernel_bytes"] + counts[f"{prefix}buffered_bytes"]


@pytest.fixture
def copied(monkeypatch):
    """Every SpanCopier's counts, added up when it closes (once per copier)."""
    counts = {"direct_bytes": 0, "kernel_bytes": 0, "buffered_bytes": 0, "unannounced_bytes": 0}
    close = SpanCopier.close

    def counted_close(self):
        close(self)
        if not getattr(self, "_counted", False):
            self._counted = True
            for key in counts:
                counts[key] += getattr(self, key)

    monkeypatch.setattr(SpanCopier, "close", counted_close)
    return counts


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_hf_to_mcore_copies_every_matrix_as_bytes_unless_the_dtype_changes(single_process_run, tiny_hf):
    matrices, vectors = _bytes_by_rank(tiny_hf)
    runs = single_process_run["report"]["runs"]
    plain = [r for r in runs if r["args"].endswith("--io plain")]
    split, merged, to_bf16, page_cache = [r for r in runs if r not in plain][:4]
    assert len(plain) == 4 and all(_how(r) == (0, 0) and r["buffered_bytes"] == 0 for r in plain)  # no engine
    direct = _direct_io_works(os.path.dirname(single_process_run["ck111"]))
    want = (matrices, 0) if direct else (0, matrices)
    assert (_how(split), split["read_bytes"]) == (want, vectors)
    assert (_how(merged), merged["read_bytes"]) == (want, vectors)
    assert (_how(to_bf16), to_bf16["read_bytes"]) == ((0, 0), matrices + vectors)  # cast: read
    assert (_how(page_cache), page_cache["read_bytes"]) == ((0, matrices), vectors)
    assert split["unannounced_bytes"] == merged["unannounced_bytes"] == 0  # every copy was read ahead


@pytest.mark.slow  # shares the single-process megatron run (~10 s)
def test_hf_to_mcore_writes_the_same_files_with_direct_io_and_through_the_page_cache(single_process_run):
    direct = os.path.join(single_process_run["ck111"], "iter_0000000")
    page_cache = os.path.join(single_process_run["ck111_page_cache"], "iter_0000000")
    names = sorted(n for n in os.listdir(direct) if n.endswith(".distcp"))  # .metadata names its directory
    assert names and names == sorted(n for n in os.listdir(page_cache) if n.endswith(".distcp"))
    for name in names:
        assert filecmp.cmp(os.path.join(direct, name), os.path.join(page_cache, name), shallow=False), name


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
@pytest.mark.parametrize("io_mode", ["direct", "page-cache"])
def test_mcore_to_hf_at_111_copies_every_matrix_as_bytes(
    single_process_run, tiny_hf, tmp_path, monkeypatch, copied, io_mode
):
    matrices, vectors = _bytes_by_rank(tiny_hf)
    read_many = DistCheckpointReader.read_many
    read = {"bytes": 0}

    def counted_read_many(self, boxes):
        tensors = read_many(self, boxes)
        read["bytes"] += sum(t.nbytes for t in tensors)
        return tensors

    monkeypatch.setattr(DistCheckpointReader, "read_many", counted_read_many)
    out = convert_mcore_to_hf(
        single_process_run["ck111"], str(tmp_path / "hf"), max_shard_size="300KB", io_mode=io_mode, **QUIET
    )
    assert_same_checkpoint(tiny_hf, out)
    direct = io_mode == "direct" and _direct_io_works(tmp_path)
    assert (_how(copied), read["bytes"]) == (((matrices, 0) if direct else (0, matrices)), vectors)
    assert copied["unannounced_bytes"] == 0  # every copy was read ahead


def test_merge_and_split_never_read_a_tensor(tiny_hf, tmp_path, monkeypatch, copied):
    def no_reads(*a, **k):
        raise AssertionError("a tensor was read into memory")

    monkeypatch.setattr(DirectHFReader, "_read", no_reads)
    merged = convert_expert_layout(tiny_hf, str(tmp_path / "m"), "merge", io_mode="fast", **QUIET)
    split = convert_expert_layout(merged, str(tmp_path / "s"), "split", max_shard_size="200KB", io_mode="fast", **QUIET)
    assert_same_checkpoint(tiny_hf, split)
    total = 2 * sum(_bytes_by_rank(tiny_hf))
    assert _how(copied) == ((total, 0) if _direct_io_works(tmp_path) else (0, total))
    assert copied["unannounced_bytes"] == 0  # every copy was read ahead


def _refuse_copy_file_range(monkeypatch):
    monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))


def _refuse_o_direct(monkeypatch):
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize(
    "io_mode,refuse",
    [("direct", None), ("direct", _refuse_o_direct), ("page-cache", None), ("page-cache", _refuse_copy_file_range)],
    ids=["direct", "o_direct-refused", "page-cache", "copy_file_range-refused"],
)
def test_merge_writes_identical_files_whichever_way_bytes_are_copied(
    tiny_hf, tiny_hf_merged, tmp_path, monkeypatch, copied, io_mode, refuse
):
    """Same output with O_DIRECT, through the page cache, and where the file system refuses
    O_DIRECT (tmpfs) or copy_file_range (other file systems, older kernels)."""
    if refuse is not None:
        refuse(monkeypatch)
    out = convert_expert_layout(tiny_hf, str(tmp_path / "m"), "merge", io_mode=io_mode, **QUIET)
    shards = sorted(f for f in os.listdir(tiny_hf_merged) if f.endswith(".safetensors"))
    assert shards and shards == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    for name in shards + ["model.safetensors.index.json"]:
        assert filecmp.cmp(os.path.join(tiny_hf_merged, name), os.path.join(out, name), shallow=False), name
    total = sum(_bytes_by_rank(tiny_hf))
    if io_mode == "direct" and refuse is None and _direct_io_works(tmp_path):
        assert (copied["direct_bytes"], copied["kernel_bytes"], copied["buffered_bytes"]) == (total, 0, 0)
    elif refuse is _refuse_copy_file_range:
        assert (copied["direct_bytes"], copied["kernel_bytes"], copied["buffered_bytes"]) == (0, 0, total)
    else:
        assert (copied["direct_bytes"], copied["kernel_bytes"], copied["buffered_bytes"]) == (0, total, 0)


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
    for name, _value in byte_spans.with_read_ahead(items, Recorder(), window_bytes=250):
        out.append(name)
        if name == "t0":  # by the time t0 is copied, the ranges up to ~250 bytes ahead were asked for
            assert asked == [0, 100, 200]
    assert out == [name for name, _ in items]
    assert asked == [100 * i for i in range(10)]
