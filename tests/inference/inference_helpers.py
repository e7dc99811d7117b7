"""Ids shared by the inference tests: the tiny preset's vocabulary and the special ids used with it."""

VOCAB = 512
EOS_ID = 510
MASK_ID = 511
