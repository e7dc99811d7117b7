"""--io auto: the byte-copy engine where its checks of private torch APIs pass, else the plain path."""

import pytest

from checkpoint_converters import io_paths


def test_auto_takes_the_engine_where_its_checks_pass():
    assert io_paths.engine_problem() is None  # both tested stacks
    assert io_paths.resolve_io("auto", log=lambda *a: None) == "direct"
    assert [io_paths.resolve_io(m) for m in ("plain", "direct", "page-cache")] == ["plain", "direct", "page-cache"]


def test_auto_falls_back_to_plain_when_a_check_fails(monkeypatch):
    monkeypatch.setattr(io_paths, "engine_problem", lambda: "torch_dcp_writer_internals: _write_item is gone")
    notes = []
    assert io_paths.resolve_io("auto", log=notes.append) == "plain"
    assert notes == [
        "note: the byte-copy engine does not fit this torch (torch_dcp_writer_internals: _write_item is gone); "
        "using --io plain"
    ]
    with pytest.raises(ValueError, match="io mode must be one of plain, fast, direct, page-cache, auto, not 'turbo'"):
        io_paths.resolve_io("turbo")
