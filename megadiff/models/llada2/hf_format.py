"""How LLaDA2 HF dirs store their tensors (ModelFamily.hf_format).

- Routed experts: split per expert (released checkpoints) or merged per layer (dFactory's training
  format); hf_experts.py has both layouts. Readers get split names either way.
- An autoregressive Ling-2.0 dir (BailingMoeV2: LLaDA2's architecture and weight names) holds
  `num_nextn_predict_layers` multi-token-prediction layers after the L decoder layers
  (`model.layers.{L+i}.*`); a diffusion model has no use for them, so loaders leave them out.
"""

from megadiff.models.family import HFFormat

from . import hf_experts
from .hf_experts import SPLIT, detect_expert_format, expected_shapes, split_tensor_getter


class LLaDA2HFFormat(HFFormat):
    experts = hf_experts  # converters: split / merged expert layouts (tools/moe_convertor.py)
    remote_code = True  # megadiff.hf's LLaDA2 remote code

    def unused_tensors(self, hf_config: dict, names) -> frozenset[str]:
        extra_layers = hf_config.get("num_nextn_predict_layers") or 0
        if not isinstance(extra_layers, int) or isinstance(extra_layers, bool) or extra_layers <= 0:
            return frozenset()
        first = hf_config["num_hidden_layers"]
        prefixes = tuple(f"model.layers.{first + i}." for i in range(extra_layers))
        return frozenset(n for n in names if n.startswith(prefixes))

    def expected_shapes(self, family, hf_config: dict, names, where: str) -> dict[str, tuple[int, ...]]:
        return expected_shapes(hf_config, detect_expert_format(names, where) or SPLIT)

    def tensor_getter(self, reader, where: str):
        return split_tensor_getter(reader, detect_expert_format(reader.names(), where))


HF_FORMAT = LLaDA2HFFormat()
