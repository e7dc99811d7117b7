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


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="Transformer Engine is not installed (pip install -e .[gpu])")
def test_parameter_table_te_keys_are_a_te_models_sharded_state_dict_keys():
    """The TE checkpoint keys the converters write (parameter table, spec "te") are exactly the
    tensor keys a real TE-spec model saves, at layout (1,1,1); TE's extra objects are `_extra_state`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from checkpoint_converters.dist_keys import units_for
    from megadiff.models.llada2.config import LLaDA2ModelConfig, ParallelLayout
    from megadiff.models.llada2.model import build_model
    from megadiff.models.llada2.presets import preset
    from megadiff.platform.distributed import init_distributed, initialize_parallel

    hf_config = preset("tiny")
    init_distributed()
    initialize_parallel(ParallelLayout())
    (model,) = build_model(LLaDA2ModelConfig.from_hf_dict(hf_config), ParallelLayout(), use_te=True)
    items = list(nested_values(model.sharded_state_dict()))
    tensors = {i.key for i in items if isinstance(i, (ShardedTensor, ShardedTensorFactory))}  # gated fc1: a factory
    objects = {i.key for i in items if isinstance(i, ShardedObject)}
    assert tensors == {u.key for u in units_for(hf_config, "te")}
    assert objects and all(k.endswith("_extra_state") for k in objects)
