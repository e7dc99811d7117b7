"""An autoregressive Ling-2.0 checkpoint (BailingMoeV2: LLaDA2's architecture and weight names, causal
attention) as the start of a diffusion model: the LLaDA2.0 report's continued pretraining reads it as
block diffusion with block size 1.

- Its multi-token-prediction layers (`num_nextn_predict_layers` of them, stored as `model.layers.{L+i}.*`
  after the L decoder layers) predict further next tokens; a diffusion model has no use for them, so
  they are left out when such a dir is loaded or converted (`mtp_tensor_names`).
- What training records (and exports) is a LLaDA2 model (`as_llada2_config`): model_type llada2_moe,
  megadiff's remote code instead of Ling's causal one, and the mask token id, which Ling's tokenizer
  does not have (model.mask_token_id names it).
"""

from megadiff.models.registry import family_for_config

from .remote_code import AUTO_MAP

AUTOREGRESSIVE_MODEL_TYPES = ("bailing_moe_v2", "bailing_moe")


def is_autoregressive(hf_config: dict) -> bool:
    return hf_config.get("model_type") in AUTOREGRESSIVE_MODEL_TYPES


def mtp_tensor_names(hf_config: dict, names) -> frozenset[str]:
    """The multi-token-prediction tensors among `names` (see the module docstring): what the
    family's HF format (ModelFamily.hf_format) says a loader leaves out."""
    return family_for_config(hf_config).hf_format.unused_tensors(hf_config, names)


def as_llada2_config(hf_config: dict, mask_token_id: int) -> dict:
    """The config.json of a diffusion model trained from `hf_config` (module docstring); a LLaDA2
    config comes back as it is."""
    if not is_autoregressive(hf_config):
        return hf_config
    drop = ("num_nextn_predict_layers", "mtp_loss_scaling_factor", "auto_map", "architectures", "model_type")
    out = {k: v for k, v in hf_config.items() if k not in drop}
    out.update(model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], auto_map=dict(AUTO_MAP))
    out["mask_token_id"] = int(mask_token_id)
    return out
