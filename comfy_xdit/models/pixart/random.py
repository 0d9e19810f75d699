"""PixArt-shaped transformers with random weights: tests, the demo and benchmarks.

Full-size presets are the released XL-2 models (28 blocks, 16 heads of 72 = 1152 wide, T5-XXL's 4096-wide text;
speed depends on shapes, not values), configured as their original files load: ``interpolation_scale`` is the
position-embedding interpolation ComfyUI reads off the file's ``pos_embed`` (sample_size // 64), None where a
file has none (diffusers' layout) and ComfyUI derives it from each latent's size. PixArt-α 1024-MS has the
size / aspect-ratio micro-conditions; PixArt-Σ has none. Every PixArt head is 72 wide (ComfyUI assumes 16 heads
of 1152), so the tiny presets have 4 heads (Ulysses 4) of 72 at a small text width.
"""

from __future__ import annotations

_COMMON = dict(attention_head_dim=72, in_channels=4, out_channels=8, patch_size=2, sample_size=128)
_XL = dict(_COMMON, num_attention_heads=16, num_layers=28, cross_attention_dim=1152, caption_channels=4096)
_TINY = dict(_COMMON, num_attention_heads=4, cross_attention_dim=288, caption_channels=64)
PIXART_PRESETS = {
    "pixart-alpha-xl-2-1024": dict(_XL, interpolation_scale=2, use_additional_conditions=True),
    "pixart-sigma-xl-2-1024": dict(_XL, interpolation_scale=2, use_additional_conditions=False),
    "pixart-sigma-xl-2-2048": dict(_XL, sample_size=256, interpolation_scale=4, use_additional_conditions=False),
    # α as a diffusers-layout file (positions from each latent's size), Σ as an original file (a fixed
    # interpolation of 2, read off its pos_embed); 3 blocks split unevenly over 2 PipeFusion stages
    "tiny-pixart-alpha": dict(_TINY, num_layers=2, interpolation_scale=None, use_additional_conditions=True),
    "tiny-pixart-sigma": dict(_TINY, num_layers=3, interpolation_scale=2, use_additional_conditions=False),
}
