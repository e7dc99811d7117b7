"""Adapter-only LoRA checkpoints: the base record and its fingerprint, the checks before a resume or a
load (each error names the culprit), and the reader the exporters use."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megadiff.checkpoint.format import MCORE_CONFIG_NAME, META_NAME, build_meta
from megadiff.checkpoint.reader import DistCheckpointReader
from megadiff.errors import CheckpointError
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.lora.adapter_checkpoint import adapter_meta, check_resume, read_lora_checkpoint
from megadiff.lora.base_record import BaseRecord, base_of_run, hf_fingerprint, mcore_fingerprint
from tests.dist.launch import REPO

LORA = {
    "rank": 4,
    "alpha": 8.0,
    "dropout": 0.0,
    "target_modules": ["linear_qkv", "linear_proj"],
    "experts": False,
    "init": "kaiming",
    "seed": 0,
}
HF_CONFIG = {"model_type": "llada2_moe"}


def fake_iteration(root, iteration=1, lora=None, dcp=b"dcp-metadata"):
    """A complete iteration dir as far as the file checks go (megadiff.json, metadata.json, .metadata)."""
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / MCORE_CONFIG_NAME).write_text("{}")
    (path / ".metadata").write_bytes(dcp)
    meta = {"hf_config": HF_CONFIG, "layout": {"tp": 1}, "dtype": "fp32", "lora": lora}
    (path / META_NAME).write_text(json.dumps(build_meta(iteration, meta, world_size=1)))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return str(write_tiny_model_dir(str(root / "a"), seed=0)), str(write_tiny_model_dir(str(root / "b"), seed=1))


def test_hf_fingerprint_follows_weights_and_config_not_the_path(hf_bases, tmp_path):
    a, b = hf_bases
    copy = shutil.copytree(a, tmp_path / "copy")
    assert hf_fingerprint(str(copy)) == hf_fingerprint(a)  # moved or copied: the same base
    assert hf_fingerprint(b) != hf_fingerprint(a)  # same config and tensor index, other weights
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))
    assert hf_fingerprint(str(copy)) != hf_fingerprint(a)


def test_mcore_fingerprint_changes_with_every_save_not_with_a_copy(tmp_path):
    first = fake_iteration(tmp_path / "base")
    copy = shutil.copytree(first, tmp_path / "moved" / "iter_0000001")
    assert mcore_fingerprint(str(copy)) == mcore_fingerprint(first)
    again = fake_iteration(tmp_path / "resaved")  # same shapes and metadata, written anew (a second later)
    meta = json.loads(open(os.path.join(again, META_NAME)).read())
    open(os.path.join(again, META_NAME), "w").write(json.dumps(dict(meta, saved_at="2030-01-01T00:00:01+00:00")))
    assert mcore_fingerprint(again) != mcore_fingerprint(first)
    record = base_of_run(None, str(tmp_path / "base"))  # a root: its latest iteration is the base
    assert (record.kind, record.path, record.field) == ("mcore", first, "model.init_from_mcore")


def lora_checkpoint(tmp_path, base: BaseRecord, lora=LORA):
    return fake_iteration(tmp_path / "lora_run", lora=adapter_meta(lora, base.to_dict()))


def test_resume_checks_name_the_culprit_before_any_weight_is_read(hf_bases, tmp_path):
    a, b = hf_bases
    ckpt = lora_checkpoint(tmp_path, base_of_run(a, None))
    assert check_resume(ckpt, dict(LORA, dropout=0.1, seed=3), a, None).path == a  # dropout/seed may change
    moved = shutil.copytree(a, tmp_path / "moved_base")
    assert check_resume(ckpt, LORA, str(moved), None).path == str(moved)  # a moved base is found by fingerprint
    with pytest.raises(CheckpointError, match=r"lora.rank=4, this run has lora.rank=8"):
        check_resume(ckpt, dict(LORA, rank=8), a, None)
    with pytest.raises(CheckpointError, match=r"lora.target_modules=\['linear_qkv', 'linear_proj'\], this run"):
        check_resume(ckpt, dict(LORA, target_modules=["linear_qkv"]), a, None)
    with pytest.raises(CheckpointError, match=rf"trained on the base {a} \(model.hf_dir, .*not on {b} "):
        check_resume(ckpt, LORA, b, None)
    with pytest.raises(CheckpointError, match=r"adapter-only LoRA checkpoint .*cannot be resumed as a full run"):
        check_resume(ckpt, None, a, None)
    full = fake_iteration(tmp_path / "full_run")
    with pytest.raises(CheckpointError, match=r"a full checkpoint \(no LoRA adapters\), and this run trains LoRA"):
        check_resume(full, LORA, a, None)
    assert check_resume(full, None, a, None) is None


def test_an_adapter_checkpoint_whose_base_is_gone_names_the_recorded_path_and_the_field(tmp_path):
    base = fake_iteration(tmp_path / "base")
    ckpt = lora_checkpoint(tmp_path, base_of_run(None, str(tmp_path / "base")))
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(
        CheckpointError,
        match=rf"apply to the base {base} \(megadiff.json lora.base.path\), which "
        r"does not exist.*point model.init_from_mcore at its new place",
    ):
        check_resume(ckpt, LORA, None, str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match=rf"{base} .*does not exist.*base_dir="):
        read_lora_checkpoint(ckpt)


def test_the_reader_checks_the_base_it_is_given(hf_bases, tmp_path):
    a, b = hf_bases
    ckpt = lora_checkpoint(tmp_path, base_of_run(a, None))
    with pytest.raises(CheckpointError, match=rf"trained on the base {a} .*not on {b} .*base_dir="):
        read_lora_checkpoint(ckpt, base_dir=b)
    with pytest.raises(CheckpointError, match=r"a full checkpoint, not an adapter-only LoRA checkpoint"):
        read_lora_checkpoint(fake_iteration(tmp_path / "full"))


def test_an_adapter_only_checkpoint_is_not_loaded_as_the_model_weights(hf_bases, tmp_path):
    from megadiff.checkpoint import load_model_weights

    ckpt = lora_checkpoint(tmp_path, base_of_run(hf_bases[0], None))
    with pytest.raises(
        CheckpointError, match=r"adapter-only LoRA checkpoint .*cannot be loaded as the model's weights"
    ):
        load_model_weights(os.path.dirname(ckpt), chunks=None)  # refused before the chunks are touched
    with pytest.raises(CheckpointError, match=r"adapter-only LoRA checkpoint .*cannot be the base of a LoRA run"):
        base_of_run(hf_bases[0], os.path.dirname(ckpt))  # model.init_from_mcore=<a LoRA checkpoint>


# ---- the trainer: adapter-only saves and a bit-exact resume ----------------------------------------


def run(*args):
    """A tool in one plain process (world size 1, no torchrun) -> (exit status, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    return proc.returncode, proc.stdout + proc.stderr


def losses(path):
    return [json.loads(line)["loss"] for line in open(path).read().splitlines()]


@pytest.mark.slow
@pytest.mark.repeat  # stack (b) saves and loads adapter checkpoints in test_lora and the reader test below
def test_lora_run_saves_only_adapters_and_resumes_bit_exactly(tiny_run_dir, tmp_path):
    base = tmp_path / "base"  # a megatron base (model.init_from_mcore), as a LoRA run on a converted model has
    rc, out = run("tools/convert_hf_to_mcore.py", "--hf-dir", tiny_run_dir / "hf", "--output", base)
    assert rc == 0, out[-3000:]
    # A constant LR makes the schedule independent of train.steps: 2 steps + 2 resumed = 4 straight.
    common = [
        tiny_run_dir / "cfg.yaml",
        f"model.init_from_mcore={base}",
        "train.lr_schedule=constant",
        "lora.enabled=true",
        "lora.rank=4",
        "lora.experts=true",
        "lora.dropout=0.1",
    ]
    straight, first, resumed = tmp_path / "straight.jsonl", tmp_path / "first.jsonl", tmp_path / "resumed.jsonl"
    rc, out = run(
        "tools/train.py",
        *common,
        "train.steps=4",
        f"checkpoint.save_dir={tmp_path / 'a'}",
        f"logging.metrics_file={straight}",
    )
    assert rc == 0, out[-3000:]
    rc, out = run(
        "tools/train.py",
        *common,
        "train.steps=2",
        f"checkpoint.save_dir={tmp_path / 'b'}",
        f"logging.metrics_file={first}",
    )
    assert rc == 0, out[-3000:]
    rc, out = run(
        "tools/train.py",
        *common,
        "train.steps=4",
        f"checkpoint.save_dir={tmp_path / 'b'}",
        f"logging.metrics_file={resumed}",
    )
    assert rc == 0 and "at step 2\n" in out, out[-3000:]
    assert losses(first) + losses(resumed) == losses(straight), (losses(first), losses(resumed), losses(straight))
    a, b = read_lora_checkpoint(tmp_path / "a"), read_lora_checkpoint(tmp_path / "b")
    assert a.base_dir == str(base / "iter_0000000") and a.base_kind == "mcore" and a.lora_config["rank"] == 4
    assert a.adapters.keys() == b.adapters.keys()
    assert all(torch.equal(a.adapters[k], b.adapters[k]) for k in a.adapters)  # bit-exact adapter weights
    assert "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.lora_B.weight" in a.adapters
    assert a.adapters["decoder.layers.0.self_attention.linear_qkv.lora_B.weight"].abs().sum() > 0  # trained
    # Only adapters and their optimizer state (param copy, exp_avg, exp_avg_sq): a full save holds the
    # same four copies of every base weight. Tiny model, r=4 on hidden 64 with every expert: about 11%;
    # at LLaDA2-mini shape the same count gives 3e-4 (2.7e-2 with experts), see benchmarks/lora.py.
    saved, base_reader = DistCheckpointReader(str(tmp_path / "b" / "iter_0000004")), DistCheckpointReader(a.base_dir)
    assert all(".lora_" in k or k.startswith("optimizer.") for k in saved.keys())
    adapter_elems = sum(t.numel() for t in b.adapters.values())
    stored = sum(math.prod(saved.shape(k)) for k in saved.keys())
    full_save = 4 * sum(math.prod(base_reader.shape(k)) for k in base_reader.keys())
    assert 4 * adapter_elems <= stored <= 4.1 * adapter_elems and stored < 0.15 * full_save, (stored, full_save)
    # With its base gone, the resume is refused before the model is built (the other checks, which the
    # trainer makes at the same point, are test_resume_checks_name_the_culprit_before_any_weight_is_read).
    os.rename(base, tmp_path / "moved")
    rc, out = run("tools/train.py", *common, "train.steps=6", f"checkpoint.save_dir={tmp_path / 'b'}")
    assert rc == 2 and f"apply to the base {base / 'iter_0000000'} (megadiff.json lora.base.path)" in out, out[-3000:]
    assert "point model.init_from_mcore at its new place" in out and "initial weights" not in out


@pytest.mark.dist
@pytest.mark.slow
def test_the_reader_gives_the_models_full_adapter_state_whatever_layout_saved_it(tiny_run_dir, tmp_path):
    from tests.dist.launch import run_torchrun

    out = tmp_path / "layouts.json"
    layouts = "2,1,1;1,2,1;2,2,1;1,1,2"  # TP (fc1's gated B rows, row-parallel A), EP (stacked experts), PP
    run_torchrun(
        2,
        "tests/dist/workers/lora_checkpoint_layouts.py",
        [
            "--config",
            tiny_run_dir / "cfg.yaml",
            "--layouts",
            layouts,
            "--save-root",
            tmp_path / "ckpts",
            "--out",
            out,
            "lora.enabled=true",
            "lora.rank=4",
            "lora.experts=true",
        ],
    )
    results = json.loads(out.read_text())
    assert set(results) == set(layouts.split(";"))
    for layout, r in results.items():
        # 4 layers: qkv + proj each, fc1 + fc2 of the dense MLP, 3 shared experts and 3 x 8 experts; A and B
        assert r["keys"] == 2 * (4 * 2 + 2 + 3 * 2 + 3 * 8 * 2), (layout, r)
        assert not r["only_in_model"] and not r["only_in_checkpoint"], (layout, r)
        assert r["max_abs_diff"] == 0.0 and r["max_abs"] > 0, (layout, r)  # exact, and B was trained
