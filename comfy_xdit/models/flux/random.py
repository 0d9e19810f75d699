"""Flux-shaped transformers with random weights: tests, the demo and benchmarks.

Speed depends on shapes, not values, so full-size presets time like the real models.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from ..blocks import random_transformer
from .checkpoint import FLUX_BLOCKS, rope_axes_for_head_dim

_FULL = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768)
PRESETS = {
    "tiny": dict(num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
                 joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True),
    "demo": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                 joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True),
    "flux-dev": dict(_FULL, guidance_embeds=True),
    "flux-schnell": dict(_FULL, guidance_embeds=False),
}


def flux_config(preset: str = "tiny", **overrides) -> dict:
    """FluxTransformer2DModel kwargs for a named preset; RoPE axes follow the head size unless given."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Flux preset {preset!r}; choose from {sorted(PRESETS)}")
    config = dict(patch_size=1, in_channels=64, out_channels=None, **PRESETS[preset])
    config.update(overrides)
    config.setdefault("axes_dims_rope", rope_axes_for_head_dim(config["attention_head_dim"]))
    return config


def random_flux(config: dict, seed: int = 0, dtype=torch.float32, device="cpu", std: float | None = None,
                fp8: bool = False, stage: tuple[int, int] | None = None):
    """Eval-mode Flux with random weights (blocks.random_transformer); fp8 and stage as load_flux_transformer."""
    return random_transformer(FluxTransformer2DModel, config, FLUX_BLOCKS, seed=seed, dtype=dtype, device=device,
                              std=std, fp8=fp8, stage=stage,
                              width=config["num_attention_heads"] * config["attention_head_dim"])
