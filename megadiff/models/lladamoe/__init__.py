"""LLaDA-MoE (inclusionAI LLaDA-MoE-7B-A1B-Base / -Instruct): fine-grained MoE, full-attention masked diffusion."""
