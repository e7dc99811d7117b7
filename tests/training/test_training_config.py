"""Training YAML + dotted overrides: types, choices and typos are caught with the key named."""

import glob

import pytest

from megadiff.training.config import TrainingConfigError, load_config

BASE = ["model.hf_dir=m", "data.train_files=d.jsonl"]


def test_overrides_parse_numbers_written_without_a_dot():
    cfg = load_config(None, BASE + ["train.lr=2e-5", "parallel.tp=2", "diffusion.complementary_masks=true"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tp == 2 and cfg.diffusion.complementary_masks is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'"),
        ("trian.lr=1", "unknown section 'trian'; did you mean 'train'"),
        ("parallel.tp=two", "parallel.tp must be an integer"),
        ("diffusion.mode=causal", "diffusion.mode='causal' is not one of block_diffusion, full"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_override_is_named(override, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, BASE + [override])


def test_yaml_error_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hf_dir: x\n data: [\n")
    with pytest.raises(TrainingConfigError, match=f"{path}:3"):
        load_config(str(path))


def test_missing_required_paths_are_named():
    with pytest.raises(TrainingConfigError, match="model.hf_dir is required"):
        load_config(None, ["data.train_files=x"])
    with pytest.raises(TrainingConfigError, match="data.train_files is required"):
        load_config(None, ["model.hf_dir=x"])


def test_t_range_is_checked():
    with pytest.raises(TrainingConfigError, match="0 < t_low <= t_high <= 1"):
        load_config(None, BASE + ["diffusion.t_low=0.9", "diffusion.t_high=0.5"])


@pytest.mark.parametrize("path", sorted(glob.glob("examples/configs/*.yaml")))
def test_example_configs_load_and_fit_their_model(path):
    from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset

    cfg = load_config(path)
    name = "llada2-flash" if "flash" in path else "llada2-mini" if "mini" in path else "tiny"
    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, ep=p.ep, etp=p.etp, pp=p.pp, vpp=p.vpp)
    LLaDA2ModelConfig.from_hf_dict(preset(name)).validate_layout(layout)  # raises if it does not fit
    assert cfg.model.hf_dir and (cfg.data.train_files or cfg.data.blend) and cfg.train.steps >= 1
