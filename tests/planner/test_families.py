"""The planner for every model family: its parameter list is exactly the family's tensors.

- at (1,1,1) the planner's parameters (names, sizes) are the family mapping table's megatron-core
  tensors, and their total is the parameter count of the family's own reference model (tiny
  presets with every option on and off, and the released shapes built on the meta device);
- at a sharded layout each rank's piece is what the mapping object's split gives that rank;
- tools/plan.py plans any family's preset or HF dir.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megadiff.models.common import mcore_params as P
from megadiff.models.registry import family
from megadiff.planner import active_params, rank_parameters, total_params
from megadiff.platform.parallel_layout import ParallelLayout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_OPTIONS = dict(  # LLaDA-MoE without shared expert, expert bias, QK-norm; every layer MoE
    shared_expert_intermediate_size=None,
    moe_router_enable_expert_bias=False,
    qk_layernorm=False,
    moe_layer_freq=[1, 1, 1, 1],
)
CASES = [
    ("llada2", "tiny", {}),
    ("llada", "tiny", {}),
    ("lladamoe", "tiny", {}),
    ("lladamoe", "tiny", NO_OPTIONS),
]


def _config(name, preset, overrides):
    fam = family(name)
    cfg_dict = fam.preset(preset, **overrides)
    return fam, cfg_dict, fam.config_from_hf(cfg_dict)


def _table_tensors(fam, cfg) -> dict[str, int]:
    """megatron-core parameter name -> numel, from the mapping table (buffers left out)."""
    return {
        inst.mapping.mcore.format(**inst.index): math.prod(inst.full_shape)
        for inst in fam.mapping.instances(cfg)
        if inst.mapping.param is not P.ROUTER_EXPERT_BIAS
    }


@pytest.mark.parametrize("name,preset,overrides", CASES, ids=["llada2", "llada", "lladamoe", "lladamoe-no-options"])
def test_planner_params_are_the_family_tensors_and_the_reference_count(name, preset, overrides):
    fam, cfg_dict, cfg = _config(name, preset, overrides)
    planned = {p.name: p.numel for p in rank_parameters(cfg, ParallelLayout(), 0)}
    assert planned == _table_tensors(fam, cfg)
    reference = fam.build_reference(cfg_dict)
    assert total_params(cfg) == sum(p.numel() for p in reference.parameters())
    routed = sum(p.numel() for n, p in reference.named_parameters() if ".experts." in n)
    top_k = getattr(cfg, "num_experts_per_tok", 0)
    expected_active = sum(p.numel() for p in reference.parameters()) - routed
    expected_active += routed * top_k // cfg.num_experts if cfg.num_experts else 0
    assert active_params(cfg) == expected_active


@pytest.mark.parametrize("name,preset", [("llada", "llada-8b"), ("lladamoe", "lladamoe-7b-a1b")])
def test_planner_counts_equal_the_released_reference_built_on_meta(name, preset):
    fam, cfg_dict, cfg = _config(name, preset, {})
    with torch.device("meta"):
        reference = fam.build_reference(cfg_dict)
    assert total_params(cfg) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name", ["llada", "lladamoe"])
def test_each_rank_holds_the_mapping_split_of_every_parameter(name):
    fam, _, cfg = _config(name, "tiny", {})
    layout = ParallelLayout(tp=2, ep=2 if cfg.num_experts else 1, pp=2, vpp=2)
    cfg.validate_layout(layout)
    seen = set()
    for pp_rank in range(layout.pp):
        for vp in range(layout.vpp):
            for p in rank_parameters(cfg, layout, pp_rank, vp):
                mapping, _ = fam.mapping.for_mcore_name(p.name)
                full = torch.empty(mapping_shape(fam, cfg, p.name), device="meta")
                size = (layout.etp if mapping.expert else layout.tp) if mapping.param.split is not P.REPLICATED else 1
                assert p.numel == mapping.shard(full, 0, size).numel(), p.name
                assert p.expert == mapping.expert, p.name
                seen.add(p.name)
    # EP rank 0 holds experts 0..E/ep-1 under local names; every other tensor is on some PP rank
    local = {n for n in _table_tensors(fam, cfg) if ".local_experts." not in n}
    assert local <= seen


def mapping_shape(fam, cfg, name):
    return next(
        inst.full_shape for inst in fam.mapping.instances(cfg) if inst.mapping.mcore.format(**inst.index) == name
    )


def _plan_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(REPO, "tools", "plan.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.repeat  # the CLI's wiring (stack-independent); the counts above run on both stacks
def test_plan_cli_plans_every_family(tmp_path):
    from megadiff.models.common.hf_dir import write_reference_dir

    write_reference_dir(family("lladamoe"), str(tmp_path / "moe"), seed=0)
    for args, name in (
        (["--preset", "llada-8b"], "llada-8b"),
        (["--hf-dir", str(tmp_path / "moe")], "lladamoe"),
    ):
        proc = _plan_cli(*args, "--gpus-per-node", "4", "--seq-len", "1024", "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        fam, cfg_dict, cfg = _config(name.split("-")[0], "llada-8b" if name == "llada-8b" else "tiny", {})
        assert (data["total_params"], data["active_params"]) == (total_params(cfg), active_params(cfg))
        assert data["shape"]["mode"] == "full"  # the family's recipe: full-attention masked diffusion
        assert any(p["feasible"] for p in data["plans"])
        if name == "llada-8b":  # a dense model: expert parallelism is refused, naming the field
            assert all(not p["feasible"] for p in data["plans"] if p["layout"]["ep"] > 1)
