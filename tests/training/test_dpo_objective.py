"""DPO config checks, and the pair loss on hand-computed numbers (the multi-layout parity against a
plain-PyTorch DPO is tests/dist/test_dpo.py)."""

import math

import pytest
import torch

from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.dpo import pair_losses

BASE = ["model.hf_dir=m", "data.train_files=d.jsonl", "train.objective=dpo"]


def test_dpo_defaults_follow_llada2():
    cfg = load_config(None, BASE)
    assert (cfg.dpo.beta, cfg.dpo.mc_samples, cfg.dpo.reference, cfg.dpo.label_smoothing) == (0.1, 1, "live", 0.0)
    assert load_config(None, BASE[:2]).train.objective == "sft"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.objective=ppo", "train.objective='ppo' is not one of sft, dpo"),
        ("dpo.reference=frozen", "dpo.reference='frozen' is not one of live, precomputed"),
        ("dpo.beta=0", r"dpo.beta must be > 0.0"),
        ("dpo.mc_samples=0", r"dpo.mc_samples must be >= 1"),
        ("dpo.label_smoothing=0.5", r"dpo.label_smoothing must be >= 0.0 and < 0.5"),
        ("diffusion.complementary_masks=true", "train.objective=dpo has its own ELBO loss"),
        ("diffusion.confidence_beta=2", "train.objective=dpo has its own ELBO loss"),
        ("data.mode=pad_to_max", "data.mode=pack"),
    ],
)
def test_bad_dpo_settings_are_named(override, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, BASE + [override])


def test_pair_loss_on_hand_computed_numbers():
    policy = torch.tensor([-10.0, -12.0, -5.0, -4.0])  # pair 0: (chosen, rejected), pair 1
    reference = torch.tensor([-11.0, -11.0, -5.0, -5.0])
    losses, margin = pair_losses(policy, reference, beta=0.5)
    # pair 0: ΔB = (1) - (-1) = 2 -> z = 1; pair 1: ΔB = 0 - 1 = -1 -> z = -0.5
    assert margin.tolist() == [1.0, -0.5]
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    smoothed, _ = pair_losses(policy, reference, beta=0.5, label_smoothing=0.2)
    assert smoothed[0].item() == pytest.approx(0.8 * want[0] + 0.2 * math.log1p(math.exp(1.0)), rel=1e-6)
    same, _ = pair_losses(policy, policy, beta=0.1, label_smoothing=0.3)
    assert same.tolist() == pytest.approx([math.log(2.0)] * 2, abs=1e-7)
