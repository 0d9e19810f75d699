"""HunyuanDiT-shaped transformers with random weights: tests, the demo and benchmarks.

Full-size presets are the released DiT-g/2 models (40 blocks, 16 heads of 88 = 1408 wide, an MLP of 6144, the
1024-wide BERT text of 77 tokens beside the 2048-wide mT5 text of 256; speed depends on shapes, not values):
v1.2 without the style / image-size conditions, v1.0 / v1.1 with them. The tiny presets have 4 heads (Ulysses 4)
of 16 and 6 blocks, so two long skips (block 4 takes block 1's output, block 5 block 0's) run in every test;
their pooled-text width stays 1024, which ComfyUI's HunYuanDiT hard-codes.
"""

from __future__ import annotations

_COMMON = dict(in_channels=4, patch_size=2, activation_fn="gelu-approximate", sample_size=128, learn_sigma=True,
               norm_type="layer_norm", pooled_projection_dim=1024)
_G2 = dict(_COMMON, num_attention_heads=16, attention_head_dim=88, hidden_size=1408, num_layers=40,
           mlp_ratio=6144 / 1408, cross_attention_dim=1024, cross_attention_dim_t5=2048, text_len=77, text_len_t5=256)
_TINY = dict(_COMMON, num_attention_heads=4, attention_head_dim=16, hidden_size=64, num_layers=6, mlp_ratio=4.0,
             cross_attention_dim=32, cross_attention_dim_t5=48, text_len=8, text_len_t5=12)
HUNYUAN_DIT_PRESETS = {
    "hunyuan-dit-v1.2": dict(_G2, use_style_cond_and_image_meta_size=False),
    "hunyuan-dit-v1.1": dict(_G2, use_style_cond_and_image_meta_size=True),
    "tiny-hunyuan-dit": dict(_TINY, use_style_cond_and_image_meta_size=False),
    "tiny-hunyuan-dit-v1.1": dict(_TINY, use_style_cond_and_image_meta_size=True),
}
