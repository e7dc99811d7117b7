"""Shared by the inference tests: the tiny preset's vocabulary and the special ids used with it, and a
model wrapper that records every forward."""

import torch

VOCAB = 512
EOS_ID = 510
MASK_ID = 511


class Recorder(torch.nn.Module):
    """Wraps a model: records every forward's (input_ids, position_ids) and can force EOS to be the
    certain prediction at chosen absolute positions."""

    def __init__(self, model, eos_at=()):
        super().__init__()
        self.model, self.config, self.eos_at, self.calls = model, model.config, tuple(eos_at), []

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, use_cache=False):
        self.calls.append((input_ids.clone(), position_ids.clone()))
        out = self.model(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        for position in self.eos_at:
            out.logits[position_ids == position, EOS_ID] = 1e4
        return out
