"""What the optimizer holds per rank, logged at the start of a run (LoRA's saving shows there)."""

import torch


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of what the optimizer holds on this rank: the parameters it updates (fp32 main copies
    with mixed precision, shards with the distributed optimizer) plus their Adam state. Before the
    first step the state does not exist yet and is counted as two fp32 moments per parameter."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(opt, "optimizer", opt)
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state.get(p, {})
                moments = [v for v in state.values() if torch.is_tensor(v) and v.numel() == p.numel()]
                total += p.numel() * p.element_size()
                total += sum(v.numel() * v.element_size() for v in moments) if moments else 8 * p.numel()
    return total
