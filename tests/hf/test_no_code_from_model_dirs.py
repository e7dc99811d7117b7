"""Neither training nor the tools ever run, or offer to run, Python code from a model directory: a
tokenizer that names its own code (auto_map) is refused with one line, transformers' `Do you wish to
run the custom code? [y/N]` is never asked (a stdin that would answer `y` stays unread), and the
code never runs (the marker it would write stays absent)."""

import builtins
import json
import logging.handlers
import shutil
from types import SimpleNamespace

import pytest
from transformers.dynamic_module_utils import resolve_trust_remote_code

from megadiff.hf.tokenizer import TokenizerError
from megadiff.inference.loading import load_tokenizer
from megadiff.training.config import load_config
from megadiff.training.setup import load_tokenizer_and_mask_id

CODE = """
open({marker!r}, "w").close()
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""

CONFIG_CODE = """
open({marker!r}, "w").close()
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evil_moe"
"""


@pytest.fixture
def tokenizer_with_code(tiny_run_dir, tmp_path, monkeypatch):
    """(a model dir whose tokenizer names its own code, the marker that code writes, the questions asked)."""
    hf = shutil.copytree(tiny_run_dir / "hf", tmp_path / "hf")
    marker = tmp_path / "MARKER"
    (hf / "evil_tokenizer.py").write_text(CODE.format(marker=str(marker)))
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]})
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")  # a user who says yes
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 15)  # interactive default
    return hf, marker, asked


def test_the_fixture_would_run_its_code_if_asked(tokenizer_with_code):
    """The planted tokenizer is live: transformers' own default asks, and the answer `y` runs it."""
    hf, _, asked = tokenizer_with_code
    assert resolve_trust_remote_code(None, str(hf), has_local_code=False, has_remote_code=True) is True
    assert asked and "Do you wish to run the custom code?" in asked[0]


def test_training_refuses_a_tokenizer_that_needs_code_without_asking(tiny_run_dir, tokenizer_with_code):
    hf, marker, asked = tokenizer_with_code
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"model.tokenizer_dir={hf}"])
    with pytest.raises(TokenizerError, match=rf"{hf}: its tokenizer needs Python code from the model directory"):
        load_tokenizer_and_mask_id(cfg, model_cfg=None)
    assert asked == [] and not marker.exists()


def test_the_tools_refuse_a_tokenizer_that_needs_code_without_asking(tokenizer_with_code):
    hf, marker, asked = tokenizer_with_code
    with pytest.raises(TokenizerError, match="megadiff never runs code from a model directory"):
        load_tokenizer(str(hf))
    assert asked == [] and not marker.exists()


@pytest.fixture
def config_with_code(tiny_run_dir, tmp_path, monkeypatch):
    """(a model dir whose config.json names its own code, as a released LLaDA2 dir's does, while its
    tokenizer is plain; the marker that code writes; the questions asked). The model type is one
    transformers does not know, as `llada2_moe` is in a fresh process."""
    hf = shutil.copytree(tiny_run_dir / "hf", tmp_path / "hf")
    marker = tmp_path / "MARKER"
    (hf / "evil_config.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    config = json.loads((hf / "config.json").read_text())
    config.update(model_type="evil_moe", auto_map={"AutoConfig": "evil_config.EvilConfig"})
    (hf / "config.json").write_text(json.dumps(config))
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    monkeypatch.setattr("transformers.dynamic_module_utils.TIME_OUT_REMOTE_CODE", 15)
    return hf, marker, asked


def test_a_config_json_naming_code_is_neither_asked_about_nor_run(tiny_run_dir, config_with_code):
    """The launcher's `Do you wish to run the custom code?`: transformers 5's AutoTokenizer reads
    config.json through AutoConfig first, which asks about the code that config.json's auto_map
    names (or, told not to run it, warns of an unknown model type). The trainer and the tools load
    the plain tokenizer without reading config.json's code."""
    hf, marker, asked = config_with_code
    said = logging.handlers.BufferingHandler(capacity=1000)
    logging.getLogger("transformers").addHandler(said)  # its own loggers do not propagate to the root
    try:
        cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"model.hf_dir={hf}"])
        tokenizer, mask_id = load_tokenizer_and_mask_id(cfg, SimpleNamespace(vocab_size=10**6, source="config.json"))
        assert tokenizer.convert_ids_to_tokens(mask_id) == "<|mask|>"
        assert load_tokenizer(str(hf)).get_vocab() == tokenizer.get_vocab()
    finally:
        logging.getLogger("transformers").removeHandler(said)
    assert asked == [] and not marker.exists()
    assert not [r for r in said.buffer if "evil_moe" in r.getMessage()]  # nor a word about its model type
