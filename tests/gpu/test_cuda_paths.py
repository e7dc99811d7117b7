"""Checks that only mean something on a CUDA machine. Skipped where CUDA is absent (marked `gpu`);
the TE one also needs transformer_engine. (GPU parity and speed runs belong to the GPU issue,
which needs a lent device.)"""

import importlib.util

import pytest


@pytest.mark.gpu
def test_cpu_support_refuses_to_patch_when_cuda_is_present():
    from megadiff.platform.cpu import enable_cpu_support

    with pytest.raises(RuntimeError, match="must not be used when CUDA is available"):
        enable_cpu_support()


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine is not installed (pip install -e .[gpu])")
def test_transformer_engine_spec_is_chosen_on_gpu_with_te():
    from megadiff.models.llada2.spec import transformer_engine_usable

    assert transformer_engine_usable()
