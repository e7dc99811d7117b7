"""SFT data: chat rows on disk -> validated messages -> token ids -> packed fixed-length rows -> batches.

rows.py (read + validate), tokenize.py (chat template -> ids + prompt length), packing.py (fixed-length
rows with per-document positions/ids/loss masks), dataset.py (deterministic, DP-sharded, resumable
micro-batches).
"""
