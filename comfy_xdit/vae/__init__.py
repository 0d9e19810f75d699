"""Single-file VAE loading (KL image VAEs and the Wan video VAEs) and ComfyUI-compatible IMAGE/LATENT conversion."""

from comfy_xdit.vae.loader import (
    LATENT_FORMATS, CheckpointError, VaeInfo, decode, detect_vae_layout, encode, load_vae, vae_config_from_state_dict,
    vae_to_ldm, write_vae_checkpoint)
from comfy_xdit.vae.wan import (
    detect_wan_vae_layout, is_wan_vae, latent_rows, load_wan_vae, wan_latent_stats, wan_vae_config_from_state_dict,
    wan_vae_to_original, write_wan_vae_checkpoint)

__all__ = ["LATENT_FORMATS", "CheckpointError", "VaeInfo", "decode", "detect_vae_layout", "detect_wan_vae_layout",
           "encode", "is_wan_vae", "latent_rows", "load_vae", "load_wan_vae", "vae_config_from_state_dict",
           "vae_to_ldm", "wan_latent_stats", "wan_vae_config_from_state_dict", "wan_vae_to_original",
           "write_vae_checkpoint", "write_wan_vae_checkpoint"]
