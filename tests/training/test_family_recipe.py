"""The model family's diffusion recipe fills the `diffusion` fields the config did not set
(megadiff.training.recipe); what the config set wins; LLaDA2's recipe is the section's defaults;
block diffusion is refused, naming the field, for a family sampled with full attention."""

import pytest

from megadiff.models.registry import family
from megadiff.training.config import DiffusionSection, TrainingConfig, TrainingConfigError, load_config
from megadiff.training.recipe import apply_family_recipe

LLADA_RECIPE = dict(mode="full", t_low=1e-3, t_high=1.0, loss_weight="inverse_t", normalize="sequence")


def section(cfg, keys=LLADA_RECIPE):
    return {k: getattr(cfg.diffusion, k) for k in keys}


@pytest.mark.parametrize("name", ["llada", "lladamoe"])
def test_unset_fields_come_from_the_family_recipe(name):
    cfg = load_config(None, ["model.hf_dir=x", "data.train_files=x"])
    filled = apply_family_recipe(cfg, family(name))
    assert section(cfg) == LLADA_RECIPE == family(name).recipe.diffusion_defaults()
    assert set(filled) == set(LLADA_RECIPE)


def test_what_the_config_sets_wins_over_the_recipe():
    cfg = load_config(
        None, ["model.hf_dir=x", "data.train_files=x", "diffusion.t_low=0.2", "diffusion.loss_weight=none"]
    )
    apply_family_recipe(cfg, family("llada"))
    assert section(cfg) == dict(LLADA_RECIPE, t_low=0.2, loss_weight="none")


def test_a_config_built_in_code_takes_the_recipe_too():
    cfg = TrainingConfig()
    cfg.model.hf_dir, cfg.data.train_files = "x", "x"
    apply_family_recipe(cfg, family("lladamoe"))
    assert section(cfg) == LLADA_RECIPE


def test_llada2_runs_are_unchanged():
    assert family("llada2").recipe.diffusion_defaults() == {
        k: getattr(DiffusionSection(), k) for k in family("llada2").recipe.diffusion_defaults()
    }
    cfg = load_config(None, ["model.hf_dir=x", "data.train_files=x", "diffusion.mode=full", "diffusion.block_size=8"])
    before = cfg.to_dict()
    assert apply_family_recipe(cfg, family("llada2")) == {} and cfg.to_dict() == before


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["diffusion.mode=block_diffusion"], "diffusion.mode=block_diffusion"),
        (["diffusion.block_schedule=[{steps: 2, block_size: 4}, {steps: 3, mode: full}]"], "diffusion.block_schedule"),
    ],
)
def test_block_diffusion_is_refused_for_a_full_attention_family(overrides, field):
    cfg = load_config(None, ["model.hf_dir=x", "data.train_files=x", "train.steps=5", *overrides])
    with pytest.raises(TrainingConfigError, match=rf"^{field}: block diffusion .* set diffusion.mode=full"):
        apply_family_recipe(cfg, family("llada"))
    apply_family_recipe(
        load_config(None, ["model.hf_dir=x", "data.train_files=x", "train.steps=5", *overrides]), family("llada2")
    )


def test_a_full_attention_schedule_is_accepted():
    cfg = load_config(
        None,
        ["model.hf_dir=x", "data.train_files=x", "train.steps=5", "diffusion.block_schedule=[{steps: 5, mode: full}]"],
    )
    apply_family_recipe(cfg, family("llada"))
    assert cfg.diffusion.loss_weight == "inverse_t"
