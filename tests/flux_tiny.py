"""Tiny random Flux.1 transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

from comfy_xdit.models.flux_checkpoint import write_flux_checkpoint  # noqa: F401  (re-exported for tests)
from comfy_xdit.models.flux_random import flux_config, random_flux


def tiny_flux_config(**overrides) -> dict:
    return flux_config("tiny", **overrides)


def make_tiny_flux(seed=0, **overrides):
    return random_flux(tiny_flux_config(**overrides), seed=seed)
