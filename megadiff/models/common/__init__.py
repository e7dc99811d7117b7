"""Model code shared by every family: megatron-core parameter slots and HF mapping objects, the
GPTModel builder, layer specs, attention, grouped-GEMM routed experts, and plain-PyTorch reference
building blocks."""
