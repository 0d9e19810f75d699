"""Flux.1: the family spec (family.py), checkpoint loading (checkpoint.py), LoRA (lora.py), ControlNets
(controlnet.py) and random-weight presets (random.py)."""

from __future__ import annotations

import torch

from ..dit import DiTModel
from ..family import register
from .family import DEFAULT_GUIDANCE, FLUX, FLUX_LATENT, PATCH, image_ids, pack_latents, unpack_latents

register(FLUX)


class FluxModel(DiTModel):
    """A DiTModel of the Flux family (what Flux-only callers and tests construct directly)."""

    def __init__(self, transformer, mesh=None, attention_kernel: str | None = None, info=None):
        super().__init__(FLUX, transformer, mesh, attention_kernel, info)

    @classmethod
    def load(cls, path, dtype=torch.bfloat16, mesh=None, attention_kernel: str | None = None, device=None):
        device = mesh.device if mesh is not None else torch.device(device or "cpu")
        transformer, info = FLUX.load(path, dtype=dtype, device=device)
        return cls(transformer, mesh, attention_kernel, info)


def flux_conditioning(context: torch.Tensor, pooled: torch.Tensor, guidance: float | None = None) -> dict:
    """The conditioning dict a Flux denoiser takes (guidance: FluxGuidance's value, None for the default)."""
    cond = {"context": context, "pooled": pooled}
    if guidance is not None:
        cond["guidance"] = torch.tensor([float(guidance)])
    return cond


__all__ = ["DEFAULT_GUIDANCE", "FLUX", "FLUX_LATENT", "PATCH", "FluxModel", "flux_conditioning", "image_ids",
           "pack_latents", "unpack_latents"]
