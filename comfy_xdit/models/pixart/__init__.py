"""PixArt-α / PixArt-Σ: the family spec (family.py), checkpoint loading with the original <-> diffusers renaming
(checkpoint.py), LoRAs (lora.py) and random-weight presets (random.py)."""

from ..family import register
from .family import PIXART, SD15_LATENT, SDXL_LATENT

register(PIXART)

__all__ = ["PIXART", "SD15_LATENT", "SDXL_LATENT"]
