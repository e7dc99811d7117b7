"""The CPU support for megatron-core is never switched on where CUDA is usable."""

import pytest
import torch


def test_enable_cpu_support_refuses_when_cuda_is_available(monkeypatch):
    import megadiff.platform.cpu as cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu, "_ENABLED", False)
    with pytest.raises(RuntimeError, match="must not be used when CUDA is available"):
        cpu.enable_cpu_support()
    assert not cpu.cpu_support_enabled()


def test_init_distributed_only_patches_without_cuda(monkeypatch):
    import megadiff.platform.distributed as dist

    called = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("megadiff.platform.cpu.enable_cpu_support", lambda: called.append(1))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # stop before any group is made
    dist.init_distributed()
    assert called == []
