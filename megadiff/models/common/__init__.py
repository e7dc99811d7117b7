"""megatron-core building blocks that any model family can put in its layer spec (not one family's)."""
