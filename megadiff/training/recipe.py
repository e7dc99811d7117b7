"""The model family's diffusion recipe as the defaults of the training config's `diffusion` section.

Each family says how it is trained (megadiff.models.family.DiffusionRecipe): LLaDA2 is block
diffusion with t ~ U(0.3, 0.8) and the mean over masked tokens (dFactory), LLaDA and LLaDA-MoE are
full-attention masked diffusion with t ~ U(1e-3, 1), 1/t weights and the mean per sequence. Every
`diffusion.*` field of that recipe that the config did not set (in the YAML or an override) takes
the recipe's value; what the config set wins. LLaDA2's recipe equals the section's defaults, so
LLaDA2 runs are unchanged.

Refused, naming the field: block diffusion (diffusion.mode=block_diffusion, or a block phase in
diffusion.block_schedule) for a family whose sampler attends fully (SamplerDefaults.attention
"full": LLaDA's generate.py). Such a model is sampled on [prompt ; answer] with every position
seeing every other, never on the block-causal [x_t ; x_0] rows block diffusion trains on, so the
run would train a model for a sampler that does not exist for it. (The reverse is fine: LLaDA2's
continued pretraining itself has full-attention phases, and its block sampler reads a model trained
with full attention as one block.)
"""

import dataclasses

from megadiff.training.config import TrainingConfig, TrainingConfigError, validate
from megadiff.training.phases import BLOCK_DIFFUSION, run_phases

SET_BY_USER = "set_by_user"  # TrainingConfig attribute: the "section.key"s load_config was given


def set_by_user(cfg: TrainingConfig) -> frozenset[str]:
    """The keys the config file / overrides set (none for a config built in code)."""
    return frozenset(getattr(cfg, SET_BY_USER, ()))


def apply_family_recipe(cfg: TrainingConfig, family) -> dict:
    """Fill cfg.diffusion's unset recipe fields from `family.recipe` (in place) and refuse what the
    family cannot run (module docstring). Returns the fields it filled with their values."""
    given = set_by_user(cfg)
    filled = {}
    for key, value in family.recipe.diffusion_defaults().items():
        if f"diffusion.{key}" in given or getattr(cfg.diffusion, key) == value:
            continue
        if key in ("mode", "block_size") and cfg.diffusion.block_schedule:
            continue  # a schedule replaces mode and block_size
        filled[key] = value
    if filled:
        cfg.diffusion = dataclasses.replace(cfg.diffusion, **filled)
        validate(cfg)  # the recipe's values against the rest of the config
    check_family_runs(cfg, family)
    return filled


def check_family_runs(cfg: TrainingConfig, family) -> None:
    if family.sampler.attention != "full":
        return
    if cfg.diffusion.block_schedule:
        field = "diffusion.block_schedule"
        block = any(p.mode == BLOCK_DIFFUSION for p in run_phases(cfg))
    else:
        field, block = f"diffusion.mode={cfg.diffusion.mode}", cfg.diffusion.mode == BLOCK_DIFFUSION
    if block:
        raise TrainingConfigError(
            f"{field}: block diffusion trains on block-causal [x_t ; x_0] rows, but a {family.name} model is "
            f"sampled with full attention over [prompt ; answer] ({family.sampler.source}); its recipe is "
            f"full-attention masked diffusion ({family.recipe.source}): set diffusion.mode=full (or leave it unset)"
        )


def describe_recipe(cfg: TrainingConfig, family, filled: dict) -> str:
    d = cfg.diffusion
    what = f"mode={d.mode} t~U({d.t_low}, {d.t_high}) loss_weight={d.loss_weight} normalize={d.normalize}"
    if not filled:
        return f"diffusion: {what}"
    return f"diffusion: {what} ({', '.join(sorted(filled))} from the {family.name} recipe: {family.recipe.source})"
