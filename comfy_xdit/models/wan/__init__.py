"""Wan 2.1 / 2.2: the family spec (family.py), checkpoint loading through diffusers' converter (checkpoint.py)
and random-weight presets (random.py)."""

from ..family import register
from .family import WAN, WAN21_LATENT, WAN22_LATENT

register(WAN)

__all__ = ["WAN", "WAN21_LATENT", "WAN22_LATENT"]
