"""Standard benchmarks: megadiff checkpoints as an lm-evaluation-harness model (`megadiff`).

likelihood.py (the Monte-Carlo ELBO for `loglikelihood`), generation.py (`generate_until` on the
sampler), model_args.py (`--model_args`) need only megadiff; lm_eval_model.py is the lm-eval `LM` and
imports lm-eval, which is optional (`pip install -e '.[eval]'`): call `register_lm_eval_model()`.
"""

LM_EVAL_MISSING = "lm-eval is not installed; install megadiff's eval extra: pip install -e '.[eval]'"


def register_lm_eval_model():
    """Register the `megadiff` model with lm-eval and return its class; ImportError says how to get
    lm-eval when it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None
    from .lm_eval_model import MegadiffLM

    return MegadiffLM
