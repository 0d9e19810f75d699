"""SD3 / SD3.5-shaped transformers with random weights: tests, the demo and benchmarks.

Speed depends on shapes, not values, so full-size presets time like the real models. Tiny presets keep each
release's structure (dual attention, q/k norm) at a small width; pos_embed_max_size 16 makes every small latent a
crop of the position table, non-square ones included.
"""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from ..blocks import random_transformer
from .checkpoint import SAMPLE_SIZE, SD3_BLOCKS

_COMMON = dict(sample_size=SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64)
_FULL = dict(_COMMON, joint_attention_dim=4096, pooled_projection_dim=2048)
_TINY = dict(_COMMON, num_attention_heads=4, caption_projection_dim=256, joint_attention_dim=64,  # 4 heads: ulysses 4
             pooled_projection_dim=32, pos_embed_max_size=16)
SD3_PRESETS = {  # the full-size values are diffusers' transformer/config.json of each release
    "sd3-medium": dict(_FULL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None),
    "sd3.5-medium": dict(_FULL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_FULL, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
    "tiny-sd3-medium": dict(_TINY, num_layers=3, dual_attention_layers=(), qk_norm=None),
    "tiny-sd3.5-medium": dict(_TINY, num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "tiny-sd3.5-large": dict(_TINY, num_layers=2, dual_attention_layers=(), qk_norm="rms_norm"),
}


def sd3_config(preset: str = "tiny-sd3-medium", **overrides) -> dict:
    """SD3Transformer2DModel kwargs for a named preset, with overrides."""
    if preset not in SD3_PRESETS:
        raise ValueError(f"unknown SD3 preset {preset!r}; choose from {sorted(SD3_PRESETS)}")
    return dict(SD3_PRESETS[preset], **overrides)


def random_sd3(config: dict, seed: int = 0, dtype=torch.float32, device="cpu", fp8: bool = False,
               stage: tuple[int, int] | None = None):
    """Eval-mode SD3 transformer with random weights (blocks.random_transformer); fp8 and stage as
    load_sd3_transformer takes them."""
    return random_transformer(SD3Transformer2DModel, config, SD3_BLOCKS, seed=seed, dtype=dtype, device=device,
                              fp8=fp8, stage=stage, width=config["num_attention_heads"] * config["attention_head_dim"])
