"""HunyuanDiT v1.0 / v1.1 / v1.2: the family spec (family.py), checkpoint loading with the original <-> diffusers
renaming (checkpoint.py) and random-weight presets (random.py)."""

from ..family import register
from .family import HUNYUAN_DIT, SDXL_LATENT

register(HUNYUAN_DIT)

__all__ = ["HUNYUAN_DIT", "SDXL_LATENT"]
