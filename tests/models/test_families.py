"""Model families: the registry, validated configs (unsupported field combinations refused by name),
mapping tables that cover exactly each reference model's tensors, and the family facts."""

import pytest

from megadiff.errors import ConfigError
from megadiff.models.registry import families, family, family_for_config, known_model_types
from megadiff.platform.parallel_layout import ParallelLayout
from megadiff.training.config import load_config

VARIANTS = {
    "llada": {"tiny": {}, "mha": dict(n_kv_heads=4), "llada-8b": None},
    "lladamoe": {
        "tiny": {},
        "no_bias_no_shared_no_qknorm": dict(
            moe_router_enable_expert_bias=False, shared_expert_intermediate_size=None, qk_layernorm=False
        ),
        "all_moe": dict(moe_layer_freq=[1, 1, 1, 1], dense_intermediate_size=None),
        "lladamoe-7b-a1b": None,
    },
    "llada2": {"tiny": {}, "llada2-mini": None},
}
REQUIRED = ["model.hf_dir=/m", "data.train_files=/d.jsonl"]  # load_config needs them; nothing is read
CASES = [(f, v) for f, variants in VARIANTS.items() for v in variants]


def _config(fam, variant):
    overrides = VARIANTS[fam.name][variant]
    return fam.preset("tiny", **overrides) if overrides is not None else fam.preset(variant)


def test_unknown_model_type_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        family_for_config({"model_type": "qwen3"}, source="/m/config.json")
    message = str(err.value)
    assert "/m/config.json: model_type: 'qwen3'" in message
    assert all(t in message for t in ("llada", "lladamoe", "llada2_moe"))
    assert set(known_model_types()) >= {"llada", "lladamoe", "llada2_moe", "bailing_moe_v2"}
    with pytest.raises(ConfigError, match="known families: llada, llada2, lladamoe"):
        family("dream")


@pytest.mark.parametrize("fam_name,variant", CASES)
def test_every_preset_resolves_to_its_family_and_validates(fam_name, variant):
    fam = family(fam_name)
    d = _config(fam, variant)
    assert family_for_config(d) is fam
    cfg = fam.config_from_hf(d)
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size or fam_name == "llada2"
    assert len(cfg.moe_layer_pattern) == cfg.num_hidden_layers


def test_lladamoe_released_with_model_type_llada_goes_to_lladamoe():
    """LLaDA-MoE checkpoints were published with model_type "llada"; architectures tells."""
    d = dict(family("lladamoe").preset("tiny"), model_type="llada")
    assert family_for_config(d).name == "lladamoe"
    family("lladamoe").config_from_hf(d)
    with pytest.raises(ConfigError, match="model_type"):
        family("lladamoe").config_from_hf(dict(d, architectures=["SomethingElse"]))


@pytest.mark.parametrize("fam_name,variant", [c for c in CASES if VARIANTS[c[0]][c[1]] is not None])
def test_mapping_table_covers_exactly_the_reference_models_tensors(fam_name, variant):
    fam = family(fam_name)
    d = _config(fam, variant)
    cfg = fam.config_from_hf(d)
    model = fam.build_reference(d)
    want = {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.endswith("inv_freq")}
    assert fam.mapping.expected_hf_shapes(cfg) == want
    covered = [n for inst in fam.mapping.instances(cfg) for n in inst.hf]
    assert sorted(covered) == sorted(want)  # each HF tensor in exactly one mapping instance


REFUSED = [
    ("llada", dict(block_type="sequential"), "block_type"),
    ("llada", dict(block_type=None), "block_type"),  # absent: the remote code's default, sequential
    ("llada", dict(layer_norm_type="default"), "layer_norm_type"),
    ("llada", dict(activation_type="swiglu"), "activation_type"),
    ("llada", dict(weight_tying=True), "weight_tying"),
    ("llada", dict(include_bias=True), "include_bias"),
    ("llada", dict(attention_layer_norm=True), "attention_layer_norm"),
    ("llada", dict(rope=False, alibi=True), "rope"),
    ("llada", dict(residual_dropout=0.1), "residual_dropout"),
    ("llada", dict(n_kv_heads=3), "n_kv_heads"),
    ("llada", dict(d_model=66), "n_heads"),
    ("llada", dict(embedding_size=500), "embedding_size"),
    ("llada", dict(n_layers=2.0), "n_layers"),
    ("lladamoe", dict(norm_topk_prob=True), "norm_topk_prob"),
    ("lladamoe", dict(moe_router_score_function="sigmoid"), "moe_router_score_function"),
    ("lladamoe", dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    ("lladamoe", dict(router_num_group=4, router_topk_group=2), "router_num_group"),
    ("lladamoe", dict(moe_layer_freq=[1, 1]), "moe_layer_freq"),
    ("lladamoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("lladamoe", dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ("lladamoe", dict(head_dim=32), "head_dim"),
    ("lladamoe", dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
    ("lladamoe", dict(dense_intermediate_size=None), "dense_intermediate_size"),  # layer 0 is dense
    ("lladamoe", dict(num_experts_per_tok=9), "num_experts_per_tok"),
    ("lladamoe", dict(partial_rotary_factor=0.1), "partial_rotary_factor"),
    ("lladamoe", dict(model_type="olmoe"), "model_type"),
]


@pytest.mark.parametrize("fam_name,overrides,field", REFUSED, ids=[f"{f}-{k}" for f, _, k in REFUSED])
def test_unsupported_field_combination_is_refused_naming_the_field(fam_name, overrides, field):
    fam = family(fam_name)
    d = {k: v for k, v in fam.preset("tiny", **overrides).items() if v is not None or k not in overrides}
    with pytest.raises(ConfigError, match=rf"^/hf/config\.json: {field}: "):
        fam.config_from_hf(d, source="/hf/config.json")


@pytest.mark.parametrize(
    "fam_name,layout,message",
    [
        ("llada", ParallelLayout(tp=4), "n_kv_heads=2 is not divisible by --tp 4; use --tp 1, 2"),
        ("llada", ParallelLayout(ep=2), "--ep 2: this model has no experts"),
        ("lladamoe", ParallelLayout(ep=3), "num_experts=8 is not divisible by --ep 3"),
        ("lladamoe", ParallelLayout(pp=3), "num_hidden_layers=4 is not divisible by pp*vpp=3"),
    ],
)
def test_layout_the_config_cannot_split_is_refused_naming_the_field(fam_name, layout, message):
    fam = family(fam_name)
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        fam.config_from_hf(fam.preset("tiny")).validate_layout(layout)


def test_llada2_family_facts_are_the_ones_megadiff_already_uses():
    from megadiff.hf import tokenizer as tok

    facts = family("llada2").tokenizer
    assert (facts.mask_token, facts.eos_token, facts.chat_template) == (
        tok.MASK_TOKEN,
        tok.EOS_TOKEN,
        tok.LLADA2_CHAT_TEMPLATE,
    )
    assert set(facts.special_tokens) == set(tok.SPECIAL_TOKENS)
    defaults = load_config(None, REQUIRED).diffusion
    assert family("llada2").recipe.diffusion_defaults() == {
        k: getattr(defaults, k) for k in family("llada2").recipe.diffusion_defaults()
    }


@pytest.mark.parametrize("fam_name", sorted(families()))
def test_recipe_is_a_valid_training_diffusion_section(fam_name):
    recipe = family(fam_name).recipe
    overrides = [f"diffusion.{k}={v}" for k, v in recipe.diffusion_defaults().items()]
    cfg = load_config(None, REQUIRED + overrides).diffusion
    assert {k: getattr(cfg, k) for k in recipe.diffusion_defaults()} == recipe.diffusion_defaults()
    assert family(fam_name).tokenizer.mask_token in family(fam_name).tokenizer.special_tokens


@pytest.mark.parametrize("fam_name", ["llada", "lladamoe"])
def test_tiny_model_dir_reads_back_as_an_hf_checkpoint_of_its_family(fam_name, tmp_path):
    from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match, read_hf_config
    from megadiff.models.common.hf_dir import write_reference_dir

    fam = family(fam_name)
    write_reference_dir(fam, str(tmp_path), seed=3)
    cfg_dict = read_hf_config(str(tmp_path))
    assert family_for_config(cfg_dict) is fam
    reader = HFCheckpointReader(str(tmp_path))
    check_tensors_match(reader, fam.mapping.expected_hf_shapes(fam.config_from_hf(cfg_dict)))
    model = fam.build_reference(cfg_dict, seed=3)
    assert all(reader.get(n).equal(t) for n, t in model.state_dict().items())
