"""tools/make_tiny_model.py --family writes a tiny HF dir of that family that the trainer accepts:
its config validates, its tensors are what the family's table expects (the trainer's header check),
and its local tokenizer has the family's mask / EOS / end-of-turn tokens and chat template, whose
ids config.json names. Bad flags are refused in one line."""

import json

import pytest
import torch

from megadiff.hf.tokenizer import load_local_tokenizer
from megadiff.models.registry import family
from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.setup import check_weights_fit, load_tokenizer_and_mask_id
from tools.make_tiny_model import main


@pytest.mark.parametrize("name", ["llada", "lladamoe"])
def test_a_tiny_model_of_the_family_the_trainer_accepts(tmp_path, name, capsys):
    out = tmp_path / name
    assert main(["--family", name, "--output", str(out)]) == 0
    fam = family(name)
    config = json.loads((out / "config.json").read_text())
    model_cfg = fam.config_from_hf(config)
    check_weights_fit(str(out), config)  # every tensor of the family's table, shapes from the headers
    tokenizer = load_local_tokenizer(str(out))
    facts = fam.tokenizer
    cfg = load_config(None, [f"model.hf_dir={out}", "data.train_files=x"])
    _, mask_id = load_tokenizer_and_mask_id(cfg, model_cfg, fam)
    assert tokenizer.convert_ids_to_tokens(mask_id) == facts.mask_token and config["mask_token_id"] == mask_id
    assert tokenizer.eos_token == facts.eos_token and config["eos_token_id"] == tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert facts.end_of_turn in chat and "1+1?" in chat
    assert len(tokenizer) <= model_cfg.vocab_size


def test_block_diffusion_on_a_tiny_llada_stops_before_anything_is_built(tmp_path):
    from megadiff.training.loop import Trainer

    out = tmp_path / "llada"
    assert main(["--family", "llada", "--output", str(out)]) == 0
    cfg = load_config(None, [f"model.hf_dir={out}", "data.train_files=x", "diffusion.mode=block_diffusion"])
    with pytest.raises(TrainingConfigError, match="^diffusion.mode=block_diffusion: block diffusion"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--family", "qwen3"],
            "--family qwen3: unknown model family 'qwen3'; known families: llada, llada2, lladamoe",
        ),
        (["--family", "llada", "--layers", "2"], "--layers: applies to --family llada2 only"),
    ],
)
def test_bad_flags_are_refused_in_one_line(tmp_path, capsys, args, message):
    assert main([*args, "--output", str(tmp_path / "m")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
