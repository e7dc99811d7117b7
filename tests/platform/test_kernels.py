"""Fused kernels and the TE spec are chosen from what megatron-core can import, in one place
(megadiff.platform.kernels): a plain `pip install` on a GPU node (no TE, no apex) must build a
model that runs, and CPU settings must not reach a CUDA run."""

import sys
import types

import pytest
import torch

from megadiff.platform import kernels


@pytest.fixture
def fresh_import_cache():
    kernels._imports.cache_clear()
    yield
    kernels._imports.cache_clear()


def test_cpu_run_uses_no_fused_kernel():
    assert not any(kernels.fused_kernel_flags(on_cuda=False).values())


def test_cuda_without_apex_keeps_megatrons_own_fusions_only(fresh_import_cache, monkeypatch):
    for name in ("scaled_masked_softmax_cuda", "fused_weight_gradient_mlp_cuda"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    flags = kernels.fused_kernel_flags(on_cuda=True)
    assert flags == dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def test_cuda_with_apex_kernels_uses_them(fresh_import_cache, monkeypatch):
    for name in ("scaled_masked_softmax_cuda", "fused_weight_gradient_mlp_cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    flags = kernels.fused_kernel_flags(on_cuda=True)
    assert flags["masked_softmax_fusion"] and flags["gradient_accumulation_fusion"]


def test_te_spec_follows_megatrons_flags_not_a_bare_import(fresh_import_cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MEGADIFF_DEVICE")  # CUDA is the run device
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setattr(kernels, "megatron_has_te", lambda: False)  # e.g. a TE/torch ABI mismatch
    assert not kernels.transformer_engine_usable()
    monkeypatch.setattr(kernels, "megatron_has_te", lambda: True)
    assert kernels.transformer_engine_usable()


def test_te_spec_is_never_used_on_the_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "megatron_has_te", lambda: True)
    assert not kernels.transformer_engine_usable()  # tests/conftest.py pins the run device to the CPU


def test_megatron_core_still_has_the_te_flags_we_read():
    """A renamed flag would silently turn TE off everywhere; megatron-core 0.16 and 0.19 have both."""
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.models.gpt import gpt_layer_specs

    assert isinstance(te_extension.HAVE_TE, bool) and isinstance(gpt_layer_specs.HAVE_TE, bool)
    assert kernels.megatron_has_te() == (te_extension.HAVE_TE and gpt_layer_specs.HAVE_TE)
