"""The `megadiff` model of lm-evaluation-harness (0.4.x): megadiff checkpoints under lm-eval's tasks.

    lm-eval run --model megadiff --model_args pretrained=DIR,mc_num=32,batch_size=32 --tasks ...
(after `import megadiff.evaluation.lm_eval_model`, which registers it; tools/lm_eval.py does that).

- generate_until: megadiff's sampler (megadiff.evaluation.generation).
- loglikelihood: the Monte-Carlo ELBO estimate of megadiff.evaluation.likelihood, with is_greedy computed
  by the sampler when check_greedy=true, else reported False (no task scored by log-likelihood
  accuracy needs it; lambada-style `acc` does).
- loglikelihood_rolling (perplexity tasks): not supported; it raises NotImplementedError naming the task.
- apply_chat_template / tokenizer_name / chat_template: the checkpoint's chat template, for
  `--apply_chat_template`.
Prompts are encoded as written, special tokens included (the chat template's role markers), without
an added BOS (LLaDA2 has none). Model args: megadiff.evaluation.model_args.

This module imports lm-eval; nothing else in megadiff does, so megadiff works without it.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megadiff.data.tokenize import chat_template_of
from megadiff.errors import UserError

from .generation import generate_texts, greedy_matches, request_decoding
from .likelihood import estimate_loglikelihoods
from .model_args import load_for_evaluation, parse_model_args


class UnsupportedRequestError(UserError, NotImplementedError):
    """A request type the megadiff model does not implement (lm-eval expects NotImplementedError)."""


@register_model("megadiff")
class MegadiffLM(LM):
    def __init__(self, **model_args):
        super().__init__()
        self.args = parse_model_args(model_args)  # every check before anything loads
        loaded = load_for_evaluation(self.args)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.mask_id, self.eos_id, self.options = loaded.mask_id, loaded.eos_id, loaded.options
        # the ELBO's blocks: LLaDA2 is trained as block diffusion; a family trained with full attention
        # (recipe mode "full": LLaDA, LLaDA-MoE) scores the whole sequence as one block, as LLaDA's eval does
        full = loaded.family is not None and loaded.family.recipe.mode == "full"
        self.likelihood_block_length = sys.maxsize if full else self.options.block_length
        self._device = next(self.model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval always passes its --batch_size (default 1) and --device here too: a model arg wins."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- requests ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args[:2]) for request in requests]
        with self._progress(len(requests), "megadiff loglikelihood", disable_tqdm) as bar:
            scores = estimate_loglikelihoods(
                self.model,
                pairs,
                mask_id=self.mask_id,
                mc_num=self.args.mc_num,
                batch_size=self.args.batch_size,
                block_length=self.likelihood_block_length,
                seed=self.args.seed,
                progress=bar.update,
            )
        if self.args.check_greedy:
            greedy = greedy_matches(
                self.model,
                pairs,
                self.options,
                mask_id=self.mask_id,
                eos_id=self.eos_id,
                batch_size=self.args.batch_size,
            )
        else:
            greedy = [False] * len(pairs)
        for request, score, is_greedy in zip(requests, scores, greedy, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, (score, is_greedy))
        return list(zip(scores, greedy, strict=True))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        task = getattr(requests[0], "task_name", None) if requests else None
        raise UnsupportedRequestError(
            f"task {task or '?'} needs loglikelihood_rolling (perplexity of a whole text), which the megadiff "
            f"model does not support: a diffusion model has no left-to-right likelihood; use tasks scored by "
            f"loglikelihood (multiple choice) or generate_until"
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts = [self._encode(request.args[0]) for request in requests]
        decodings = [request_decoding(self.options, dict(request.args[1] or {})) for request in requests]
        with self._progress(len(requests), "megadiff generate_until", disable_tqdm) as bar:
            texts = generate_texts(
                self.model,
                self.tokenizer,
                prompts,
                decodings,
                mask_id=self.mask_id,
                eos_id=self.eos_id,
                batch_size=self.args.batch_size,
                progress=bar.update,
            )
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    # ---- chat template -------------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            chat_template=chat_template_of(self.tokenizer),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return chat_template_of(self.tokenizer) if chat_template else None

    # ---- helpers -------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context go to the continuation, and the continuation is
        what encoding context + continuation adds after the context's ids."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self._encode(context)
        whole = self._encode(context + continuation)
        return context_ids, whole[len(context_ids) :]

    def _progress(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or self.rank != 0)
