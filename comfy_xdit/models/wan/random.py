"""Wan-shaped transformers with random weights: tests, the demo and benchmarks.

Full-size presets are diffusers' transformer/config.json of each release (speed depends on shapes, not values).
Tiny presets keep each release's structure at a small width; every Wan model has 128-wide heads (ComfyUI reads
the head count as width // 128), so 4 heads (Ulysses 4) need width 512.
"""

from __future__ import annotations

_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, freq_dim=256, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, pos_embed_seq_len=None)
_T2V = dict(_COMMON, in_channels=16, out_channels=16, text_dim=4096, image_dim=None, added_kv_proj_dim=None)
_TINY = dict(num_attention_heads=4, ffn_dim=1024, num_layers=2, text_dim=64)
WAN_PRESETS = {
    "wan2.1-t2v-1.3b": dict(_T2V, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_T2V, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan2.1-i2v-14b": dict(_T2V, in_channels=36, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                           image_dim=1280, added_kv_proj_dim=5120),
    "wan2.2-ti2v-5b": dict(_T2V, in_channels=48, out_channels=48, num_attention_heads=24, ffn_dim=14336,
                           num_layers=30),
    "tiny-wan-t2v": dict(_T2V, **_TINY),
    "tiny-wan-i2v": dict(_T2V, **dict(_TINY, num_layers=2), in_channels=36, image_dim=32, added_kv_proj_dim=512),
    "tiny-wan-ti2v": dict(_T2V, **_TINY, in_channels=48, out_channels=48),
}
