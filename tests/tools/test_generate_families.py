"""tools/generate.py and tools/eval_gsm8k.py on tiny LLaDA and LLaDA-MoE HF dirs: the family comes from
config.json, its sampler defaults apply unless flags override them, and the tokens are the sampler's
called directly on the loaded reference model (untrained models: the pipeline is what is checked)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from megadiff.hf.reference import load_reference_model
from megadiff.hf.tokenizer import build_tiny_tokenizer
from megadiff.inference import DecodingOptions, encode_prompt, generate, load_model, load_tokenizer, special_token_ids
from megadiff.models.common.hf_dir import write_reference_dir
from megadiff.models.registry import family
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_family_dir(path, name):
    """A tiny HF dir of family `name`: weights, config.json and a tiny tokenizer (with the family's
    special tokens where megadiff.hf.tokenizer can build them)."""
    fam = family(name)
    cfg = write_reference_dir(fam, str(path), seed=0)
    build_tiny_tokenizer(path, fam.tokenizer)
    return cfg


@pytest.fixture(scope="module", params=["llada", "lladamoe"])
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_family_dir(path, request.param)
    return request.param, str(path)


def test_hf_dir_of_any_family_loads_bit_exact(family_dir):
    name, path = family_dir
    fam = family(name)
    loaded = load_reference_model(path)
    assert type(loaded) is type(fam.build_reference(fam.preset("tiny")))
    expected = fam.build_reference(fam.preset("tiny"), seed=0)
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, atol=0, rtol=0)


def test_generate_tool_uses_the_family_sampler_and_equals_the_sampler(family_dir, tmp_path, capsys):
    name, path = family_dir
    out = tmp_path / "gen.jsonl"
    argv = ["--model", path, "--prompt", "What is 2 + 2?", "--output", str(out), "--device", "cpu"]
    argv += ["--gen-length", "16", "--block-length", "8"]  # --steps and --rule: the family's
    assert load_tool("generate").main(argv) == 0
    echoed = capsys.readouterr().out.splitlines()[0]
    sampler = family(name).sampler
    assert f"--rule {sampler.rule}" in echoed and f"--steps {sampler.steps}" in echoed
    row = json.loads(out.read_text())
    tokenizer, model = load_tokenizer(path), load_model(path)
    mask_id, eos_id = special_token_ids(model, tokenizer)
    prompt = encode_prompt("What is 2 + 2?", tokenizer)
    options = DecodingOptions(rule="low_confidence", gen_length=16, block_length=8, steps=sampler.steps)
    assert row["prompt_ids"] == prompt
    assert row["generated_ids"] == generate(model, [prompt], options, mask_id, eos_id).tokens[0]


def test_eval_gsm8k_runs_on_lladamoe_with_overridden_steps(tmp_path, capsys):
    model_dir = tmp_path / "lladamoe"
    write_family_dir(model_dir, "lladamoe")
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n" for q, a in [("1+1?", 2), ("2+3?", 5)])
    )
    argv = ["--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / "eval"), "--device", "cpu"]
    argv += ["--gen-length", "8", "--block-length", "4", "--steps", "4"]
    assert load_tool("eval_gsm8k").main(argv) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["decoding"]["rule"] == "low_confidence" and summary["decoding"]["steps"] == 4
    assert summary["total"] == 2 and summary["forward_passes"] > 0


def test_llada_mask_and_eos_ids_come_from_the_family(tmp_path):
    """Tokenizer without the family's mask token: config.json's mask_token_id; without that either:
    the family's released id."""
    cfg = family("llada").preset("tiny")
    assert special_token_ids(cfg, None) == (cfg["mask_token_id"], cfg["eos_token_id"])
    released = dict(cfg, mask_token_id=None)
    assert special_token_ids(released, None)[0] == family("llada").tokenizer.mask_token_id == 126336


def test_missing_tensor_of_a_new_family_dir_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from megadiff.errors import CheckpointError

    write_family_dir(tmp_path, "llada")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.transformer.blocks.1.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'model.transformer.blocks.1.up_proj.weight' is missing"):
        load_model(str(tmp_path))


def test_mcore_checkpoint_of_a_new_family_decodes_like_its_hf_dir(tmp_path, capsys):
    """LLaDA-MoE HF dir -> tools/convert_hf_to_mcore.py -> tools/generate.py on the checkpoint: the
    reference model read back from the checkpoint (hf_tensors) is the HF dir's bit for bit, and the
    tokenizer is the recorded HF source dir's."""
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "mcore"
    write_family_dir(hf_dir, "lladamoe")
    convert = [sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", str(hf_dir), "--output", str(ckpt)]
    proc = subprocess.run(convert + ["--no-progress"], cwd=REPO, capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_ckpt, from_hf = load_model(str(ckpt)), load_model(str(hf_dir))
    ids = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_ckpt(ids).logits, from_hf(ids).logits, atol=0, rtol=0)
    outputs = []
    for model in (ckpt, hf_dir):
        out = tmp_path / f"{model.name}.jsonl"
        argv = ["--model", str(model), "--prompt", "1+1?", "--output", str(out), "--device", "cpu"]
        assert load_tool("generate").main(argv + ["--gen-length", "8", "--block-length", "4"]) == 0
        outputs.append(json.loads(out.read_text())["generated_ids"])
    assert outputs[0] == outputs[1]
