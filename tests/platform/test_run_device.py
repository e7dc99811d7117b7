"""The run device: one decision (megadiff.platform.device) that the trainer, the sampler's CLI
defaults and `dtype: auto` follow; tests outside tests/gpu are pinned to the CPU also where CUDA
exists, and torchrun workers started by tests see no CUDA at all."""

import pytest
import torch

from megadiff.platform import device
from tests.dist.launch import worker_env


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cuda_node_gives_cuda_local_rank_nccl_and_bf16(cuda_present, monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.run_device() == torch.device("cuda", 3)
    assert device.distributed_backend() == "nccl"
    assert device.default_params_dtype() == torch.bfloat16


def test_tests_are_pinned_to_cpu_fp32_gloo_even_with_cuda(cuda_present):
    from megadiff.inference.loading import default_device, parse_dtype
    from megadiff.training.config import TrainingConfig
    from megadiff.training.loop import params_dtype

    assert device.run_device() == torch.device("cpu")  # tests/conftest.py pinned it
    assert device.distributed_backend() == "gloo"
    cfg = TrainingConfig()
    assert cfg.model.dtype == "auto" and params_dtype(cfg) == torch.float32
    assert default_device() == "cpu" and parse_dtype("auto", default_device()) == torch.float32


def test_bad_pin_names_the_variable(monkeypatch):
    monkeypatch.setenv(device.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="MEGADIFF_DEVICE='tpu'"):
        device.run_device()


def test_pin_to_cuda_without_cuda_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match="MEGADIFF_DEVICE=cuda, but torch sees no CUDA device"):
        device.run_device()


def test_to_run_device_moves_nested_batches():
    batch = {"ids": torch.ones(2), "pair": (torch.zeros(1), None), "n": 3}
    moved = device.to_run_device(batch)
    assert moved["ids"].device == device.run_device() and moved["pair"][1] is None and moved["n"] == 3


def test_torchrun_workers_of_cpu_tests_hide_cuda():
    env = worker_env(base={"CUDA_VISIBLE_DEVICES": "0,1", "MEGADIFF_DEVICE": "cuda", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["MEGADIFF_DEVICE"] == "cpu"
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"


def test_gpu_workers_keep_cuda_and_follow_it():
    env = worker_env(gpu=True, base={"CUDA_VISIBLE_DEVICES": "0,1", "MEGADIFF_DEVICE": "cpu"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and "MEGADIFF_DEVICE" not in env
