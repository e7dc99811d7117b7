"""LLaDA 8B (GSAI-ML LLaDA-8B-Base / -Instruct, LLaDA 1.5): dense, full-attention masked diffusion."""
