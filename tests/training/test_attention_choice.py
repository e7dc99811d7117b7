"""model.attention_backend=auto and the price of dense masks (megadiff.training.perf_preflight)."""

import dataclasses

import pytest

from megadiff.training.config import TrainingConfig, TrainingConfigError
from megadiff.training.perf_preflight import choose_attention_backend, dense_scores_bytes
from tests.training.test_perf_config import CPU, H100

MINI = dict(heads=16, layers_per_stage=20, dtype_bytes=2)  # LLaDA2-mini: 16 heads, 20 layers, bf16


def cfg(mode="block_diffusion", backend="auto", seq=4096, micro=2, packing="pack", recompute="none", tp=1):
    c = TrainingConfig()
    c.model.attention_backend = backend
    c.diffusion.mode = mode
    c.data.max_seq_len, c.data.mode = seq, packing
    c.train.micro_batch_size = micro
    c.perf.recompute_granularity = recompute
    c.parallel.tp = tp
    return c


@pytest.mark.parametrize(
    "kwargs, env, backend",
    [
        (dict(mode="block_diffusion"), H100, "flex"),
        (dict(mode="full", packing="pack"), H100, "flex"),
        (dict(mode="full", packing="pad_to_max", seq=512, micro=1), H100, "dense"),
        (dict(mode="block_diffusion", seq=64), CPU, "dense"),
        (dict(mode="block_diffusion", recompute="selective", seq=256, micro=1), H100, "dense"),
        (dict(backend="flex"), CPU, "flex"),
    ],
)
def test_auto_picks(kwargs, env, backend):
    assert choose_attention_backend(cfg(**kwargs), env, **MINI).backend == backend


def test_dense_scores_hand_count():
    # mini at 2x4096 block diffusion: b=2, 16 heads, S_in = 8192, 20 layers, 2 bytes
    assert dense_scores_bytes(2, 16, 1, 8192, 20, 2) == 2 * 16 * 8192 * 8192 * 20 * 2  # 80 GiB
    assert dense_scores_bytes(2, 16, 2, 8192, 20, 2) * 2 == dense_scores_bytes(2, 16, 1, 8192, 20, 2)


def test_dense_is_refused_above_half_the_gpu():
    with pytest.raises(
        TrainingConfigError, match=r"80.0 GiB, more than half of the 80 GiB.*model.attention_backend=flex"
    ):
        choose_attention_backend(cfg(backend="dense"), H100, **MINI)


def test_dense_warns_with_its_memory():
    choice = choose_attention_backend(cfg(backend="dense", seq=2048, micro=1), H100, **MINI)
    assert choice.backend == "dense" and choice.dense_scores_bytes == 16 * 4096 * 4096 * 20 * 2
    assert "10.0 GiB" in choice.warning and "flex" in choice.warning
    small = choose_attention_backend(cfg(backend="dense", seq=256, micro=1), H100, **MINI)
    assert small.warning is None  # 0.16 GiB: no warning
    big_gpu = dataclasses.replace(H100, gpu_memory_bytes=1 << 40)
    assert choose_attention_backend(cfg(backend="dense"), big_gpu, **MINI).warning is not None
