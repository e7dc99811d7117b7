"""Where megadiff meets the hardware: process groups, and CPU/gloo support for megatron-core."""

from .distributed import init_distributed, initialize_parallel, is_rank0, on_gpu, print_rank0
