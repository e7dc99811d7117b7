"""Tiny LLaDA2 inputs for the converter tests, built once per session, and the two launches that
run megatron-core (kept to one single-process run and one 4-process torchrun for the whole suite)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.dist.launch import REPO, run_torchrun, worker_env

WORKERS = os.path.join(REPO, "tests", "dist", "workers")


@pytest.fixture(scope="session")
def conv_root(tmp_path_factory):
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="session")
def tiny_hf(conv_root):
    """fp32, split experts, with tokenizer + remote code (a real download's layout): the template."""
    from megadiff.hf.tiny import write_tiny_model_dir

    return write_tiny_model_dir(str(conv_root / "tiny_hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_bf16(conv_root, tiny_hf):
    """The same model in bf16 with the router bias in fp32, as LLaDA2 ships."""
    from megadiff.hf.reference import load_reference_model, save_reference_model

    out = str(conv_root / "tiny_hf_bf16")
    model = load_reference_model(tiny_hf).to(torch.bfloat16)
    for _, block in model.moe_blocks():
        block.gate.expert_bias.data = block.gate.expert_bias.data.float()
    save_reference_model(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(tiny_hf, name), os.path.join(out, name))
    return out


@pytest.fixture(scope="session")
def tiny_hf_merged(conv_root, tiny_hf):
    from checkpoint_converters.moe import convert_expert_layout

    return convert_expert_layout(
        tiny_hf, str(conv_root / "tiny_hf_merged"), "merge", progress=False, log=lambda *a: None
    )


PLAIN_TWINS_SINGLE = ("ck111", "ck111_merged", "ck111_to_bf16", "te1")
PLAIN_TWINS_FOUR = ("ck222", "ck222_bf16")


@pytest.fixture(scope="session")
def single_process_run(conv_root, tiny_hf, tiny_hf_merged):
    """tools/convert_hf_to_mcore.py in one plain process: split input, merged input (with a
    requested (2,2,2) layout, saved at (1,1,1)), fp32 input saved as bf16, the split input again
    through the page cache (--io page-cache), and a conversion interrupted by a Ctrl-C. Then the
    Transformer Engine name chain: ck111 (local) -> HF -> te1 (--spec te) -> HF -> te2 (--spec te)
    and -> local2 (--spec local). The runs in PLAIN_TWINS_SINGLE and both exports are repeated
    with `--io plain` into `<output>-plain` (compared bit for bit in test_roundtrip); the others name
    the byte-copy engine (`--io fast`; the CLI's default is plain)."""
    out = conv_root / "single.json"
    paths = {
        "ck111": str(conv_root / "ck111"),
        "ck111_merged": str(conv_root / "ck111_merged"),
        "ck111_to_bf16": str(conv_root / "ck111_to_bf16"),
        "ck111_page_cache": str(conv_root / "ck111_page_cache"),
        "interrupted": str(conv_root / "ck_interrupted"),
        "te1": str(conv_root / "te1"),
        "te2": str(conv_root / "te2"),
        "local2": str(conv_root / "local2"),
    }
    hf_a, hf_b = conv_root / "hf_from_ck111", conv_root / "hf_from_te1"
    cmd = [
        sys.executable,
        os.path.join(WORKERS, "convert_single.py"),
        "--out",
        str(out),
        "--run-both",
        f"--hf-dir {tiny_hf} --output {paths['ck111']} --io fast",
        "--run-both",
        f"--hf-dir {tiny_hf_merged} --output {paths['ck111_merged']} --tp 2 --ep 2 --pp 2 --io fast",
        "--run-both",
        f"--hf-dir {tiny_hf} --output {paths['ck111_to_bf16']} --dtype bf16 --io fast",
        "--run",
        f"--hf-dir {tiny_hf} --output {paths['ck111_page_cache']} --io page-cache",
        "--export",
        f"{paths['ck111']}={hf_a}",
        "--run-both",
        f"--hf-dir {hf_a} --output {paths['te1']} --spec te --io fast",
        "--export",
        f"{paths['te1']}={hf_b}",
        "--run",
        f"--hf-dir {hf_b} --output {paths['te2']} --spec te --io fast",
        "--run",
        f"--hf-dir {hf_b} --output {paths['local2']} --spec local --io fast",
        "--interrupt",
        f"{tiny_hf}={paths['interrupted']}",
    ]
    env = worker_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    report = json.loads(out.read_text())
    assert [r["rc"] for r in report["runs"]] == [0] * 11, report
    return dict(paths, report=report, log=proc.stdout, plain_twins=PLAIN_TWINS_SINGLE, exports=[hf_a, hf_b])


@pytest.fixture(scope="session")
def four_process_run(conv_root, tiny_hf, tiny_hf_bf16, single_process_run):
    """One 4-process torchrun at TP2/EP2/PP2: converts fp32 and bf16 inputs at that layout, saves a
    training-like checkpoint, and loads checkpoints across layouts, comparing with the reference."""
    paths = {
        "ck222": str(conv_root / "ck222"),
        "ck222_bf16": str(conv_root / "ck222_bf16"),
        "trained": str(conv_root / "trained"),
    }
    out = conv_root / "four.json"
    ck111 = single_process_run["ck111"]
    run_torchrun(
        4,
        os.path.join(WORKERS, "convert_layouts.py"),
        [
            "--layout",
            "2,2,2",
            "--convert",
            f"{tiny_hf}={paths['ck222']}",
            "--convert",
            f"{tiny_hf_bf16}={paths['ck222_bf16']}",
            "--save",
            f"{paths['trained']}={paths['ck222']}",
            "--load",
            f"{ck111}@2,2,2",
            "--load",
            f"{paths['ck222']}@1,1,1",
            "--load",
            f"{paths['ck222']}@1,1,2,2",
            "--load",
            f"{paths['trained']}@1,1,1",
            "--load",
            f"{single_process_run['te1']}@2,2,2",
            "--te-request",
            f"{ck111}@2,2,2",
            "--reference",
            tiny_hf,
            "--out",
            out,
        ],
    )
    return dict(paths, results=json.loads(out.read_text()), plain_twins=PLAIN_TWINS_FOUR)
