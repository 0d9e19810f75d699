"""Single-file KL VAE loading and ComfyUI-compatible IMAGE/LATENT conversion."""

from comfy_xdit.vae.loader import (
    LATENT_FORMATS, CheckpointError, VaeInfo, decode, detect_vae_layout, encode, load_vae, vae_config_from_state_dict,
    vae_to_ldm, write_vae_checkpoint)

__all__ = ["LATENT_FORMATS", "CheckpointError", "VaeInfo", "decode", "detect_vae_layout", "encode", "load_vae",
           "vae_config_from_state_dict", "vae_to_ldm", "write_vae_checkpoint"]
