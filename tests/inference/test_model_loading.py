"""Loading a model dir for decoding: HF dirs, mcore checkpoint detection, tokenizer and special ids."""

import os

import pytest
import torch

from megadiff.hf.reference import build_reference_model
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import (
    ChatSession,
    DecodingOptions,
    encode_chat,
    encode_prompt,
    load_model,
    load_tokenizer,
    loading,
)
from megadiff.inference.loading import is_mcore_checkpoint, special_token_ids
from megadiff.models.llada2.presets import preset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llada2")), seed=0)


def test_hf_dir_loads_the_saved_reference_model(model_dir):
    loaded = load_model(model_dir)
    original = build_reference_model(loaded.config.to_dict(), seed=0)
    ids = torch.arange(40)[None]
    assert torch.equal(loaded(ids).logits, original(ids).logits)
    assert not loaded.training


def test_special_ids_come_from_tokenizer_and_config_unless_overridden(model_dir):
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    mask_id, eos_id = special_token_ids(model, tokenizer)
    assert mask_id == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert eos_id == model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert special_token_ids(model, tokenizer, mask_id=7, eos_id=9) == (7, 9)


def test_missing_model_dir_error_names_it(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model: model directory not found"):
        load_model(missing)


def test_missing_tokenizer_error_names_the_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer files"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("marker", ["latest_checkpointed_iteration.txt", "megadiff.json"])
def test_mcore_checkpoint_dir_is_loaded_as_an_mcore_checkpoint(tmp_path, monkeypatch, marker):
    (tmp_path / marker).write_text("7\n" if marker.endswith(".txt") else "{}")
    seen = {}

    def load_reference_from_mcore(ckpt_dir, iteration=None, dtype=torch.float32, trust_checkpoint=False):
        seen.update(ckpt_dir=ckpt_dir, iteration=iteration, dtype=dtype, trust=trust_checkpoint)
        return build_reference_model(preset("tiny"))

    monkeypatch.setattr(loading, "load_reference_from_mcore", load_reference_from_mcore)
    assert is_mcore_checkpoint(str(tmp_path))
    model = load_model(str(tmp_path), dtype=torch.float64, iteration=7)
    assert seen == {"ckpt_dir": str(tmp_path), "iteration": 7, "dtype": torch.float64, "trust": False}
    assert not model.training


def test_mcore_checkpoint_tokenizer_is_the_recorded_hf_source_dirs(model_dir, tmp_path):
    import json

    from megadiff.checkpoint.format import build_meta

    iter_dir = tmp_path / "iter_0000007"
    iter_dir.mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    (iter_dir / "metadata.json").write_text("{}")
    hf_config = json.load(open(os.path.join(model_dir, "config.json")))  # what a conversion records
    meta = build_meta(
        7, {"hf_config": hf_config, "layout": {"tp": 1}, "dtype": "fp32", "hf_source_dir": model_dir}, world_size=1
    )
    (iter_dir / "megadiff.json").write_text(json.dumps(meta))
    assert load_tokenizer(str(tmp_path)).get_vocab() == load_tokenizer(model_dir).get_vocab()
    assert load_tokenizer(str(iter_dir), iteration=7).name_or_path == model_dir
    # A recorded dir whose config.json is not the checkpoint's (a received checkpoint can name any
    # directory) is not used.
    meta["hf_config"] = preset("tiny")
    (iter_dir / "megadiff.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="its config.json differs from the config recorded"):
        load_tokenizer(str(tmp_path))
    meta["hf_source_dir"] = None
    (iter_dir / "megadiff.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*pass --tokenizer DIR"):
        load_tokenizer(str(tmp_path))


def test_hf_dir_is_not_taken_for_an_mcore_checkpoint(model_dir):
    assert not is_mcore_checkpoint(model_dir)


def test_text_prompts_use_the_chat_template_unless_raw(model_dir):
    tokenizer = load_tokenizer(model_dir)
    templated = tokenizer.decode(encode_prompt("What is 2 + 2?", tokenizer))
    assert templated == "<role>HUMAN</role>What is 2 + 2?<|role_end|><role>ASSISTANT</role>"
    assert tokenizer.decode(encode_prompt("What is 2 + 2?", tokenizer, raw=True)) == "What is 2 + 2?"


def test_chat_session_prompt_holds_every_earlier_turn(model_dir):
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    mask_id, eos_id = special_token_ids(model, tokenizer)
    session = ChatSession(
        model, tokenizer, DecodingOptions(gen_length=16, block_length=8), mask_id, eos_id, system="Be brief."
    )
    first, _, _ = session.reply("Hello")
    _, prompt_ids, _ = session.reply("And then?")
    expected = encode_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ],
        tokenizer,
    )
    assert prompt_ids == expected
    session.reset()
    _, prompt_ids, _ = session.reply("Hello")
    assert tokenizer.decode(prompt_ids).startswith("<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hello")
    assert session.turns == 1


def test_moe_experts_choice_sets_how_the_reference_runs_its_experts(model_dir):
    """grouped / auto: batched (torch._grouped_mm) experts; sequential: the per-expert loop; the
    two decode the same logits. te (megatron-core only) is refused naming the flag."""
    ids = torch.arange(40)[None]
    logits = {}
    for choice, batched in (("sequential", False), ("grouped", True), ("auto", True)):
        model = load_model(model_dir, moe_experts=choice)
        assert all(block.batched_experts is batched for _, block in model.moe_blocks()), choice
        with torch.no_grad():
            logits[choice] = model(ids).logits
    assert torch.allclose(logits["grouped"], logits["sequential"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--moe-experts te: decoding runs the plain-PyTorch reference model"):
        load_model(model_dir, moe_experts="te")
