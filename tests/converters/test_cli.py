"""The converter command lines: tools/*.py are thin wrappers over checkpoint_converters.cli (the
console scripts' code), with no sys.path edits and no child processes; --spec's default is decided
in-process from the installed packages and the device nodes."""

import os

import pytest

from checkpoint_converters.cli import hf_to_mcore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERTER_TOOLS = ("convert_hf_to_mcore", "convert_mcore_to_hf", "moe_convertor", "average_checkpoints")


@pytest.mark.parametrize("tool", CONVERTER_TOOLS)
def test_converter_tools_are_thin_wrappers_without_path_edits_or_child_processes(tool):
    with open(os.path.join(REPO, "tools", tool + ".py")) as f:
        text = f.read()
    assert "sys.path" not in text and "subprocess" not in text, tool
    assert "from checkpoint_converters.cli import" in text and len(text.splitlines()) < 30, tool
    for name in os.listdir(os.path.join(REPO, "checkpoint_converters", "cli")):
        with open(os.path.join(REPO, "checkpoint_converters", "cli", name)) as f:
            body = f.read()
        assert "sys.path" not in body and "subprocess" not in body, name


@pytest.mark.parametrize(
    "te_installed, visible, nodes, want",
    [
        (False, None, ["/dev/nvidia0"], "local"),  # no Transformer Engine
        (True, None, ["/dev/nvidia0"], "te"),
        (True, "0,1", ["/dev/nvidia0"], "te"),
        (True, "", ["/dev/nvidia0"], "local"),  # the machine's GPUs hidden by the user
        (True, None, [], "local"),  # no NVIDIA device
    ],
)
def test_spec_default_follows_te_and_a_visible_gpu_without_touching_cuda(
    monkeypatch, te_installed, visible, nodes, want
):
    monkeypatch.setattr(hf_to_mcore.importlib.util, "find_spec", lambda name: object() if te_installed else None)
    monkeypatch.setattr(hf_to_mcore.glob, "glob", lambda pattern: list(nodes))
    monkeypatch.setattr(hf_to_mcore, "_MACHINE_CUDA_VISIBLE_DEVICES", visible)
    assert hf_to_mcore.training_spec_here() == want


def test_hide_gpus_keeps_the_machines_setting_for_the_spec_default(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(hf_to_mcore, "_MACHINE_CUDA_VISIBLE_DEVICES", None)
    hf_to_mcore.hide_gpus()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and hf_to_mcore._MACHINE_CUDA_VISIBLE_DEVICES == "3"
    hf_to_mcore.hide_gpus()  # a second call (tests run main twice) keeps the machine's value
    assert hf_to_mcore._MACHINE_CUDA_VISIBLE_DEVICES == "3"
