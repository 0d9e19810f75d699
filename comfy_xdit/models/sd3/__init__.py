"""SD3 / SD3.5: the family spec (family.py), checkpoint loading through diffusers' converter (checkpoint.py)
and random-weight presets (random.py)."""

from ..family import register
from .family import SD3, SD3_LATENT

register(SD3)

__all__ = ["SD3", "SD3_LATENT"]
