"""The LoRA branch of a megatron-core parallel linear: y = W x + (alpha / r) * B A dropout(x).

Why not Megatron-Bridge's `peft`: megatron-bridge 0.3.1 (PyPI) requires megatron-core < 0.17,
transformers < 5 and transformer-engine (CUDA), and Bridge main requires transformers >= 5.8, so it
installs on neither tested stack (megatron-core 0.16.1 + transformers 5.x; 0.19.2 + 4.57.6) nor on a
CPU-only machine. The design follows Bridge's (A/B split like the base layer, scale alpha/r); the
code is written on megatron-core's own tensor-parallel mappings.

A wrapped linear keeps its class (a subclass is swapped in, as torch's FSDP2 does), its parameter
names and its checkpoint keys; the adapter adds two child modules, `lora_A` and `lora_B`, each
holding one `weight`. Splits, over the base layer's own group (`tp_group`: TP, or expert-TP for
routed experts):

- column-parallel base (linear_qkv, linear_fc1): A [r, in] replicated, B [out/tp, r] split over
  output rows exactly like the base weight (linear_fc1: this rank's gate rows, then its up rows).
  The input gets the base's communication (sequence-parallel all-gather, or the identity whose
  backward all-reduces); each rank's A gradient covers only its B rows, so it is summed over the group.
- row-parallel base (linear_proj, linear_fc2): A [r, in/tp] split over input columns, B [out, r]
  replicated. A's partial products are all-reduced (reduce-scattered over the sequence under
  sequence parallelism) before B, so only an r-wide tensor crosses the group; B's gradient is summed
  over the group wherever its ranks see different rows.
- expert linears with explicit expert communication (the token dispatcher gathers their input and
  sums their outputs over expert-TP): the branch does no communication of its own; its output is a
  partial sum like the base's, and the replicated weight's gradient is summed over expert-TP.

Dropout acts on the branch input; under TP the ranks of a column-parallel layer draw independent masks.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

# How the full lora_A / lora_B tensor is divided over the base layer's group.
REPLICATED, ROWS, COLS, GATED_ROWS = "replicated", "rows", "cols", "gated_rows"


class _Weight(torch.nn.Module):
    """A module holding one parameter, so adapter parameters are named `lora_A.weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


class _LinearSummingWeightGrad(torch.autograd.Function):
    """F.linear(x, w) for a weight replicated over `group` whose ranks see different gradients:
    w's gradient is summed over the group; x's gradient stays this rank's own."""

    @staticmethod
    def forward(ctx, x, weight, group):
        ctx.save_for_backward(x, weight)
        ctx.group = group
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        torch.distributed.all_reduce(grad_w, group=ctx.group)
        return grad_x, grad_w, None


def _linear_summing_weight_grad(x, weight, group):
    if group is None or group.size() == 1:
        return F.linear(x, weight)
    return _LinearSummingWeightGrad.apply(x, weight, group)


class _LoRAMixin:
    """What both wrapped kinds share: the adapter modules, the output sum and the checkpoint entries."""

    lora_A_split: str
    lora_B_split: str

    def add_lora(self, a_local: torch.Tensor, b_local: torch.Tensor, scale: float, dropout: float, gated: bool):
        """a_local / b_local: this rank's pieces (see `split_of`); `gated`: a gated linear_fc1."""
        self.lora_A = _Weight(a_local)
        self.lora_B = _Weight(b_local)
        self.lora_scale = scale
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_gated = gated
        expert_reduce = getattr(self.weight, "allreduce", True)  # False: routed experts (EP)
        for name, split in (("lora_A", self.lora_A_split), ("lora_B", self.lora_B_split)):
            param = getattr(self, name).weight
            param.allreduce = expert_reduce  # DDP reduces expert params over the expert-DP group
            parallel = split != REPLICATED and self.tp_group.size() > 1
            param.tensor_model_parallel = parallel  # grad norm: replicated ones counted once
            param.partition_dim = 0 if split in (ROWS, GATED_ROWS) else 1
            param.partition_stride = 1

    def split_of(self, which: str) -> str:
        split = self.lora_A_split if which == "lora_A" else self.lora_B_split
        return GATED_ROWS if split == ROWS and which == "lora_B" and self.lora_gated else split

    def forward(self, input_, *args, **kwargs):
        output, bias = super().forward(input_, *args, **kwargs)
        return output + self.lora_delta(input_).to(output.dtype), bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's entries plus lora_A / lora_B, split as in this layer's group."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        tensors = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        axes = {
            f"{name}.weight": 0 if split in (ROWS, GATED_ROWS) else 1
            for name in ("lora_A", "lora_B")
            if (split := self.split_of(name)) != REPLICATED
        }
        adapter = make_sharded_tensors_for_checkpoint(
            tensors, prefix, axes, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        if self.lora_gated:  # [gate_r; up_r] rows: saved as two separately sharded halves, like fc1's weight
            key = f"{prefix}lora_B.weight"
            singleton = metadata.get("singleton_local_shards", False)
            adapter[key] = apply_swiglu_sharded_factory(adapter[key], sharded_offsets, singleton)
        state.update(adapter)
        return state


class LoRAColumnParallel(_LoRAMixin):
    """Mixed in front of ColumnParallelLinear: A replicated, B split over output rows."""

    lora_A_split, lora_B_split = REPLICATED, ROWS

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        if self.explicit_expert_comm or group.size() == 1:
            h = x  # the dispatcher already gathered the tokens
        elif self.sequence_parallel:
            h = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
        else:
            h = copy_to_tensor_model_parallel_region(x, group=group)
        u = _linear_summing_weight_grad(self.lora_dropout(h), self.lora_A.weight, group)
        return F.linear(u, self.lora_B.weight) * self.lora_scale


class LoRARowParallel(_LoRAMixin):
    """Mixed in front of RowParallelLinear: A split over input columns, B replicated."""

    lora_A_split, lora_B_split = COLS, REPLICATED

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        group = self.tp_group
        u = F.linear(self.lora_dropout(x), self.lora_A.weight)  # this rank's input columns
        if self.explicit_expert_comm or group.size() == 1:
            # output stays a partial sum over expert-TP, like the base's (the dispatcher sums it)
            y = _linear_summing_weight_grad(u, self.lora_B.weight, group)
        elif self.sequence_parallel:
            u = reduce_scatter_to_sequence_parallel_region(u, group=group)
            y = _linear_summing_weight_grad(u, self.lora_B.weight, group)  # ranks hold different tokens
        else:
            u = reduce_from_tensor_model_parallel_region(u, group=group)
            y = F.linear(u, self.lora_B.weight)  # every rank sees the same tokens and gradient
        return y * self.lora_scale


_CLASSES: dict[tuple[type, type], type] = {}


def lora_class(base_cls: type, mixin: type) -> type:
    """The adapted subclass of `base_cls` (one per base class, so isinstance checks still hold)."""
    key = (base_cls, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"LoRA{base_cls.__name__}", (mixin, base_cls), {})
    return _CLASSES[key]


def shard(full: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a whole adapter tensor (gated rows keep [gate_r; up_r])."""
    if size == 1 or split == REPLICATED:
        return full
    if split == ROWS:
        return full.chunk(size, dim=0)[rank]
    if split == COLS:
        return full.chunk(size, dim=1)[rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])


def unshard(pieces: list[torch.Tensor], split: str) -> torch.Tensor:
    if len(pieces) == 1 or split == REPLICATED:
        return pieces[0]
    if split == ROWS:
        return torch.cat(pieces, dim=0)
    if split == COLS:
        return torch.cat(pieces, dim=1)
    halves = [p.chunk(2, dim=0) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
