"""Every version-dependent workaround still finds what it relies on in the installed releases.

A failure names the workaround, what it relies on and the versions it was checked on: a new
megatron-core / torch / transformers release changed something megadiff leans on, and the
workaround in megadiff/platform/compat.py must be revisited before anything else."""

import importlib.metadata

import pytest
import torch

from megadiff.platform import compat


def _installed() -> str:
    versions = []
    for package in ("megatron-core", "torch", "transformers"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    return ", ".join(versions)


@pytest.mark.parametrize("workaround", compat.WORKAROUNDS, ids=lambda w: w.name)
def test_workaround_still_applies(workaround):
    try:
        workaround.check()
        problem = None
    except compat.CompatError as e:
        problem = str(e)
    if problem:
        pytest.fail(
            f"compat workaround '{workaround.name}' broke on {_installed()}: {problem}\n"
            f"  it relies on: {workaround.relies_on}\n  checked on: {workaround.checked_on}",
            pytrace=False,
        )


def test_every_workaround_records_its_range_and_what_changed():
    names = [w.name for w in compat.WORKAROUNDS]
    assert len(names) == len(set(names)) and len(names) >= 8
    for w in compat.WORKAROUNDS:
        assert w.relies_on and w.checked_on and w.changed_0_16_to_0_19, w.name


def test_a_check_that_raises_is_reported_as_a_compat_error():
    # An AttributeError / ImportError from a changed release becomes a CompatError too.
    @compat._workaround("probe", "nothing", "nothing")
    def probe():
        raise AttributeError("module 'x' has no attribute 'y'")

    try:
        with pytest.raises(compat.CompatError, match="AttributeError: module 'x'"):
            compat.WORKAROUNDS[-1].check()
    finally:
        compat.WORKAROUNDS.pop()


def test_common_state_is_stored_the_way_the_installed_megatron_core_stores_it(tmp_path):
    """<= 0.16: common.pt next to the DCP files; 0.17+: the ShardedObject 'common_state'."""
    from megatron.core.dist_checkpointing.strategies import common

    from megadiff.platform.distributed import init_distributed

    was_initialized = torch.distributed.is_initialized()
    init_distributed()
    try:
        sharded = compat.save_common_state({"x": 1}, {"args": "a"}, str(tmp_path))
    finally:  # later in-process tests check that a refused Trainer made no process group
        if not was_initialized:
            torch.distributed.destroy_process_group()
    if hasattr(common, "TorchCommonSaveStrategy"):
        assert sharded == {"x": 1} and (tmp_path / "common.pt").is_file()
    else:
        assert not (tmp_path / "common.pt").exists()
        assert sharded["common_state"].data == {"args": "a"} and sharded["common_state"].key == "common_state"


def test_a_release_that_changes_a_private_signature_fails_the_check(monkeypatch):
    from torch.distributed.checkpoint import filesystem

    monkeypatch.setattr(filesystem, "_write_item", lambda stream, data, write_item, storage_key: None)
    [dcp] = [w for w in compat.WORKAROUNDS if w.name == "torch_dcp_writer_internals"]
    with pytest.raises(compat.CompatError, match="_write_item"):
        dcp.check()


def test_a_release_that_drops_a_private_function_fails_the_check(monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    monkeypatch.delattr(mcore_random, "_set_cuda_rng_state")
    [rng] = [w for w in compat.WORKAROUNDS if w.name == "rng_tracker_cpu_states"]
    with pytest.raises(compat.CompatError, match="_set_cuda_rng_state is gone"):
        rng.check()
