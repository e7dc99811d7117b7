"""LoRA adapters on megadiff's megatron-core models, any family (issue 16; families: issue 28).

- `adapters`: the low-rank branch of one column- or row-parallel linear, split like its base.
- `apply`: wrap the targeted linears of model chunks, freeze everything else, initialise.
- `state`: whole (unsharded) adapter tensors under global names, gathered or loaded at any layout.
"""
