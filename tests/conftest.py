"""Shared pytest set-up: GPU tests skip cleanly where CUDA is absent; every other test runs with
the run device pinned to the CPU (fp32, gloo), also on a GPU node; a tiny LLaDA2 HF dir and
synthetic SFT data are built once per session."""

import json
import os

import pytest
import torch

from megadiff.platform import install_import_hook


def pytest_configure(config):
    install_import_hook()  # before any test module imports megatron-core
    # One thread per test process: on 2-core machines torch's default threads fight with the
    # torchrun workers that other tests launch, and tiny-model tests slow down many-fold.
    torch.set_num_threads(1)


# MEGADIFF_TESTS=light (CI's second stack): skip the tests marked `repeat`. They re-check, at
# layouts another test already runs, behaviour that does not depend on the installed versions;
# every layout, parity, bit-exact resume, the converter round trips, the sampler and the demo
# pipeline still run.
TEST_SETS = ("full", "light")


def pytest_collection_modifyitems(config, items):
    test_set = os.environ.get("MEGADIFF_TESTS", "full")
    if test_set not in TEST_SETS:
        raise pytest.UsageError(f"MEGADIFF_TESTS={test_set!r}; choose one of {TEST_SETS}")
    skip_gpu = pytest.mark.skip(reason="needs CUDA; this machine has no GPU")
    skip_repeat = pytest.mark.skip(reason="MEGADIFF_TESTS=light: covered by the other stack's full run")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "repeat" in item.keywords and test_set == "light":
            item.add_marker(skip_repeat)


@pytest.fixture(autouse=True)
def run_device_for_the_test(request, monkeypatch):
    """Tests not marked `gpu` compute on the CPU in fp32 even where CUDA exists (their tolerances
    are fp32 ones, and `dtype: auto` would be bf16 on CUDA); subprocesses inherit the pin, and
    torchrun workers also hide CUDA (tests/dist/launch.py). `gpu` tests follow CUDA."""
    from megadiff.platform.device import DEVICE_ENV

    if "gpu" in request.keywords:
        monkeypatch.delenv(DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(DEVICE_ENV, "cpu")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    from megadiff.data.synthetic import arithmetic_problems, as_messages
    from megadiff.hf.tiny import write_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_run")
    write_tiny_model_dir(str(root / "hf"), seed=0)
    with open(root / "train.jsonl", "w") as f:
        for row in arithmetic_problems(64, seed=1):
            f.write(json.dumps(as_messages(row)) + "\n")
    with open(root / "memorise.jsonl", "w") as f:
        for row in arithmetic_problems(16, seed=3):
            f.write(json.dumps(as_messages(row)) + "\n")
    (root / "cfg.yaml").write_text(
        f"model: {{hf_dir: {root / 'hf'}}}\n"
        f"data: {{train_files: {root / 'train.jsonl'}, max_seq_len: 128}}\n"
        "train: {steps: 5, global_batch_size: 4, micro_batch_size: 1, lr: 1.0e-3}\n"
        "diffusion: {mode: block_diffusion, block_size: 8}\n"
        "logging: {progress_bar: false}\n"
    )
    return root


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MB tmpfs (needs root, as in the CI container); skipped where mount is not allowed."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)])
