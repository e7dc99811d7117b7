"""What megadiff needs to know about a model family, in one object.

A family is one folder, `megadiff/models/<family>/`, whose `family.py` defines one `ModelFamily`:

- `config_from_hf(cfg_dict, source)`: HF config.json -> the family's validated, frozen config
  (fields it does not support are refused, naming the field). Every family config has these
  attributes, which generic code reads: vocab_size (rows of the embedding), hidden_size,
  ffn_hidden_size (dense layers), num_hidden_layers, num_attention_heads, num_key_value_heads,
  head_dim, rotary_dim, rope_theta, rms_norm_eps, max_position_embeddings, num_experts (0: dense),
  moe_ffn_hidden_size, moe_layer_pattern (0 = dense layer, 1 = MoE layer), eos_token_id,
  pad_token_id, source; and `validate_layout(layout)`.
- `transformer_config(cfg, layout, params_dtype, use_te, on_cpu, **overrides)`: megatron-core
  TransformerConfig; `layer_spec(cfg, tconfig, use_te, vp_stage, core_attention)`: the decoder block
  spec; `gpt_model_args(cfg)`: the remaining GPTModel arguments (vocab, RoPE, tying).
- `mapping`: a MappingTable of mapping objects (megadiff.models.common.mapping): HF <-> megatron
  names, transforms and TP/EP splits.
- `build_reference(cfg_dict, seed)`: the plain-PyTorch reference model with HF names (the oracle).
- `tokenizer`: TokenizerFacts; `recipe`: DiffusionRecipe; `sampler`: SamplerDefaults.
- `presets`: named HF config dicts (released shapes and a `tiny` CPU test model).

megadiff.models.registry maps an HF `model_type` to its family. Generic code (checkpoint,
converters, data, diffusion, training, inference, LoRA, planner) receives a ModelFamily and never
imports a family module.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TokenizerFacts:
    """Special tokens of a family's released tokenizer.

    mask_token / mask_token_id: the diffusion mask (the id is read from the tokenizer by name when
    mask_token_id is None). eos_token: end of text (also the pad token of every family so far).
    chat_template: the Jinja template of the released tokenizer's turns, for tokenizers built
    locally (a downloaded tokenizer carries its own). end_of_turn: the token that closes a turn."""

    mask_token: str
    mask_token_id: int | None
    eos_token: str
    eos_token_id: int | None
    end_of_turn: str
    chat_template: str
    special_tokens: tuple[str, ...]


@dataclass(frozen=True)
class DiffusionRecipe:
    """How the family is trained (defaults of the training config's `diffusion` section).

    mode: "block_diffusion" ([x_t ; x_0], block-causal) or "full" (full-attention masked
    diffusion). The noise level t ~ U(t_low, t_high); each answer token is masked with probability
    t; the prompt is never masked. loss_weight / normalize: megadiff.diffusion.loss options."""

    mode: Literal["block_diffusion", "full"]
    block_size: int | None
    t_low: float
    t_high: float
    loss_weight: Literal["none", "inverse_t"]
    normalize: Literal["masked_tokens", "answer_tokens", "sequence"]
    source: str  # where the recipe comes from

    def diffusion_defaults(self) -> dict:
        """The training config's `diffusion` fields this recipe sets."""
        out = dict(
            mode=self.mode,
            t_low=self.t_low,
            t_high=self.t_high,
            loss_weight=self.loss_weight,
            normalize=self.normalize,
        )
        if self.block_size is not None:
            out["block_size"] = self.block_size
        return out


@dataclass(frozen=True)
class SamplerDefaults:
    """How the family's official code generates.

    rule: "threshold" (LLaDA2 model card: commit every position above `threshold`, at least the
    step quota) or "low_confidence" (LLaDA generate.py: commit the step quota of most confident
    positions). attention: "block_causal" (a block sees itself and earlier blocks; prefix cache) or
    "full" (every position sees every other). blocks_from: "start" (blocks aligned to position 0,
    the prompt cut into blocks) or "prompt_end" (blocks start after the prompt)."""

    rule: Literal["threshold", "low_confidence"]
    attention: Literal["block_causal", "full"]
    blocks_from: Literal["start", "prompt_end"]
    gen_length: int
    block_length: int
    steps: int
    threshold: float | None
    temperature: float = 0.0
    source: str = ""


class HFFormat:
    """How a family's HF dirs store its tensors, for code that reads them (the trainer). This
    default: every tensor under its mapping table's HF name, nothing else needed. A family whose
    dirs come in other layouts (LLaDA2: dFactory's merged experts; Ling-2.0's unused MTP layers)
    sets `ModelFamily.hf_format` to a subclass."""

    def unused_tensors(self, hf_config: dict, names) -> frozenset[str]:
        """Tensors among `names` a dir may hold that the model does not use (loaders skip them)."""
        return frozenset()

    def expected_shapes(self, family, hf_config: dict, names, where: str) -> dict[str, tuple[int, ...]]:
        """Every tensor name and shape a dir `where` holding `names` must have for `hf_config`."""
        return family.mapping.expected_hf_shapes(family.config_from_hf(hf_config, where))

    def tensor_getter(self, reader, where: str) -> Callable:
        """get(HF name of the mapping table) -> tensor, from `reader` (megadiff.hf.checkpoint_reader
        .HFCheckpointReader)."""
        return reader.get

    # For the converters: LLaDA2's expert-layout functions (split / dFactory's merged:
    # megadiff.models.llada2.hf_experts), or None when a family's dirs have one layout; and whether
    # megadiff ships the family's remote code (written into exported HF dirs without a template).
    experts = None
    remote_code = False


@dataclass(frozen=True)
class ModelFamily:
    """One model family (module docstring)."""

    name: str
    model_types: tuple[str, ...]  # HF config.json model_type values of this family
    architectures: tuple[str, ...]  # HF config.json architectures
    config_from_hf: Callable  # (cfg_dict, source="config.json") -> validated config
    transformer_config: Callable
    layer_spec: Callable
    gpt_model_args: Callable
    mapping: object  # megadiff.models.common.mapping.MappingTable
    build_reference: Callable  # (cfg_dict, seed=None) -> torch.nn.Module with HF names
    tokenizer: TokenizerFacts
    recipe: DiffusionRecipe
    sampler: SamplerDefaults
    presets: dict = field(default_factory=dict)
    hf_format: HFFormat = HFFormat()  # how HF dirs store the tensors (HFFormat)

    def build_model(self, model_cfg, layout, **kwargs):
        """This family's megatron-core GPTModel chunks for the current rank (one per virtual
        pipeline chunk): megadiff.models.common.gpt.build_gpt_chunks, whose keyword arguments
        (params_dtype, use_te, attention_backend, xt_only_logits, moe_experts, TransformerConfig
        overrides) it takes."""
        from megadiff.models.common.gpt import build_gpt_chunks  # megatron-core: only to build

        return build_gpt_chunks(self, model_cfg, layout, **kwargs)

    def preset(self, name: str, **overrides) -> dict:
        """A copy of preset `name`'s HF config fields, with overrides applied."""
        if name not in self.presets:
            raise ValueError(f"unknown {self.name} preset '{name}'; choose one of {sorted(self.presets)}")
        return dict(copy.deepcopy(self.presets[name]), **overrides)
