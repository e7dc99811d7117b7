"""LoRA adapters merged into HF weights: W + alpha/r * B @ A, as per-tensor deltas in HF names.

The delta of an adapted base weight is computed in megatron's layout (B's rows are megatron's) and
mapped to HF by the family's mapping object of that weight, like the weight itself; the transform
only moves rows, so hf(W + delta) = hf(W) + hf(delta). A converter adds each delta to its HF tensor
in fp64 and rounds once to the tensor's dtype.
"""

from collections.abc import Mapping

import torch

from megadiff.models.registry import family_of

from .peft_format import adapted_modules, hf_modules, model_config


class HFDeltas(Mapping):
    """{HF tensor name: delta} of every adapted weight, each computed when asked for: a converter
    streams tensors one at a time, and the deltas of all routed experts of a 100B model are as
    large as the model. A delta is computed in fp64 (B @ A, scaled), so the merged weight is the
    exact W + alpha/r * B @ A rounded once to the weight's dtype. `merged_experts`: routed experts'
    deltas stacked [E, ...] under dFactory's merged names, as that layout stores the weights (a family
    with such a layout names it: `ModelFamily.hf_format.experts`, LLaDA2's)."""

    def __init__(self, full: dict[str, torch.Tensor], lora_cfg: dict, hf_config, merged_experts: bool = False):
        self._full, self._cfg = full, model_config(hf_config)
        self._scale = lora_cfg["alpha"] / lora_cfg["rank"]
        self._sources: dict[str, list[tuple[str, int]]] = {}  # HF name -> (adapted module, output index) parts
        for path in adapted_modules(lora_cfg, self._cfg):
            for index, name in enumerate(hf_modules(path, self._cfg)[1]):
                self._sources[name + ".weight"] = [(path, index)]
        if merged_experts and lora_cfg.get("experts"):
            cfg, family = self._cfg, family_of(self._cfg)
            layout = family.hf_format.experts
            if layout is None:
                raise ValueError(f"{family.name} checkpoints have no merged-expert layout")
            for layer in (i for i, moe in enumerate(cfg.moe_layer_pattern) if moe):
                for proj in layout.PROJS:
                    names = [layout.split_name(layer, e, proj) for e in range(cfg.num_experts)]
                    if names[0] in self._sources:
                        self._sources[layout.merged_name(layer, proj)] = [self._sources.pop(n)[0] for n in names]
        self._last: tuple[str, list[torch.Tensor]] | None = None  # fc1 yields gate and up: computed once

    def _module_deltas(self, path: str) -> list[torch.Tensor]:
        if self._last is None or self._last[0] != path:
            a = self._full[path + ".lora_A.weight"].double()
            b = self._full[path + ".lora_B.weight"].double()
            mapping = hf_modules(path, self._cfg)[0]
            self._last = (path, mapping.to_hf(self._scale * (b @ a), self._cfg))
        return self._last[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = [self._module_deltas(path)[index] for path, index in self._sources[name]]
        return parts[0] if len(parts) == 1 else torch.stack(parts)

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def hf_deltas(full: dict[str, torch.Tensor], lora_cfg: dict, hf_config, merged_experts: bool = False) -> HFDeltas:
    """The deltas of the adapters `full` (megadiff.lora.state's full adapter state), by HF name."""
    return HFDeltas(full, lora_cfg, hf_config, merged_experts)


def add_delta(weight: torch.Tensor, delta: torch.Tensor, name: str) -> torch.Tensor:
    """weight + delta, summed in fp64 and rounded once to the weight's dtype."""
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"{name}: adapter delta has shape {list(delta.shape)}, the weight {list(weight.shape)}")
    return (weight.double() + delta.double()).to(weight.dtype)
