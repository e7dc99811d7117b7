"""The CPU support for megatron-core is never switched on where CUDA is the run device, and is
where the run device is pinned to the CPU on a GPU node."""

import pytest
import torch


def test_enable_cpu_support_refuses_when_cuda_is_available(monkeypatch):
    import megadiff.platform.cpu as cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MEGADIFF_DEVICE")  # tests/conftest.py pins the CPU; here CUDA is the run device
    monkeypatch.setattr(cpu, "_ENABLED", False)
    with pytest.raises(RuntimeError, match="must not be used when CUDA is the run device"):
        cpu.enable_cpu_support()
    assert not cpu.cpu_support_enabled()


def test_init_distributed_only_patches_without_cuda(monkeypatch):
    import megadiff.platform.distributed as dist

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MEGADIFF_DEVICE")
    monkeypatch.setattr(dist, "enable_cpu_support", lambda: called.append(1))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # stop before any group is made
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    dist.init_distributed()
    assert called == []


def test_init_distributed_patches_when_the_cpu_is_pinned_on_a_gpu_node(monkeypatch):
    import megadiff.platform.distributed as dist

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "enable_cpu_support", lambda: called.append(1))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for name, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29999"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ):
        monkeypatch.setenv(name, value)  # init_distributed sets defaults; keep them out of later tests
    backends = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: backends.append(backend))
    dist.init_distributed()
    assert called == [1] and backends == ["gloo"]
