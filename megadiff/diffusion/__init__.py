"""Masked-diffusion pieces in plain PyTorch: noising (x_0 -> x_t), attention masks, the loss."""
