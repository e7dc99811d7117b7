"""When nothing fits, the planner names the nearest single change that does (more nodes, recompute,
a smaller micro-batch); and every planning command the README and docs/planner.md show finds a
layout that fits, as written."""

import contextlib
import io
import os
import re
import shlex
from dataclasses import replace

import pytest

from megadiff.models.llada2 import LLaDA2ModelConfig, preset
from megadiff.planner import Hardware, RunShape
from megadiff.planner.suggest import nearest_fitting_changes
from tools.plan import main as plan_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan_output(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan_main(argv) == 0
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.repeat  # stack-independent arithmetic
def test_flash_on_one_node_names_four_nodes_where_its_config_layout_fits():
    out = plan_output([os.path.join(REPO, "examples/configs/llada2_flash_bd_sft.yaml"), "--preset", "llada2-flash"])
    assert "0 of 111 layouts fit" in out
    nodes = re.search(r"^  --nodes (\d+): (\d+) layouts fit on (\d+) GPUs.*; this config's layout fits too", out, re.M)
    assert nodes and nodes.group(1) == "4" and int(nodes.group(2)) > 0, out[-2000:]


def test_recompute_and_micro_batch_are_offered_when_they_alone_fit():
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    hw = Hardware(gpus_per_node=8, nodes=1, gpu_memory_gb=80)
    heavy = RunShape(seq_len=8192, micro_batch_size=4, global_batch_size=64, attention_backend="flex")
    changes = {c.flags.split()[0]: c for c in nearest_fitting_changes(model, hw, heavy)}
    assert set(changes) == {"--nodes", "--recompute", "--micro-batch-size"}, list(changes)
    assert changes["--recompute"].shape.attention_backend == "dense"  # flex cannot be recomputed
    for change in changes.values():  # each one alone makes a layout fit: the planner says so itself
        assert change.fits and all(p.reason is None for p in change.fits)
    assert nearest_fitting_changes(model, replace(hw, gpu_memory_gb=1), RunShape(seq_len=4096)) == []


def documented_plan_commands() -> list[list[str]]:
    """Every `tools/plan.py ... --preset ...` command of the README and docs/planner.md."""
    commands = []
    for doc in ("README.md", "docs/planner.md"):
        for line in open(os.path.join(REPO, doc)):
            if line.startswith("tools/plan.py") and "--preset" in line:
                commands.append(shlex.split(line.split("#")[0])[1:])
    return commands


@pytest.mark.slow
@pytest.mark.repeat  # stack-independent arithmetic
def test_every_documented_planning_command_finds_a_layout_that_fits():
    commands = documented_plan_commands()
    assert any("llada2-flash" in c for c in commands) and len(commands) >= 3
    for argv in commands:
        out = plan_output(argv)
        fits = re.search(r"^(\d+) of (\d+) layouts fit", out, re.M)
        assert fits and int(fits.group(1)) > 0, (argv, out[:1500])
        if argv[0].endswith(".yaml"):
            assert "this config's layout" in out and "does not fit" not in out.split("this config's layout")[1][:200]
