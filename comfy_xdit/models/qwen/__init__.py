"""Qwen-Image (and Qwen-Image-Edit): the family spec (family.py), checkpoint loading (checkpoint.py), LoRAs
(lora.py) and random-weight presets (random.py)."""

from ..family import register
from .family import QWEN

register(QWEN)

__all__ = ["QWEN"]
