"""Qwen-Image-shaped transformers with random weights: tests, the demo and benchmarks.

The full-size preset is diffusers' transformer/config.json of Qwen/Qwen-Image (20.4B parameters; speed depends
on shapes, not values). The tiny preset keeps its structure at a small width: Qwen-Image's heads are 128 wide
(its RoPE axes, 16 + 56 + 56, fill one head), so 4 heads (Ulysses 4) need width 512.
"""

from __future__ import annotations

_COMMON = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, guidance_embeds=False,
               axes_dims_rope=(16, 56, 56))
QWEN_PRESETS = {
    "qwen-image": dict(_COMMON, num_layers=60, num_attention_heads=24, joint_attention_dim=3584),
    "tiny-qwen-image": dict(_COMMON, num_layers=2, num_attention_heads=4, joint_attention_dim=64),
}
