"""Flux-shaped transformers with random weights: tests, the demo and benchmarks.

Speed depends on shapes, not values, so full-size presets time like the real models.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from .flux_checkpoint import keep_stage, rope_axes_for_head_dim, store_blocks_fp8

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


@torch.no_grad()
def random_flux(config: dict, seed: int = 0, dtype=torch.float32, device="cpu", std: float | None = None,
                fp8: bool = False, stage: tuple[int, int] | None = None):
    """Eval-mode model with every parameter drawn from N(0, std) (q/k norm scales from 1 + N(0, 2 std)).

    std defaults to 0.05 at width 128, shrinking with sqrt(width) so wide models stay well
    conditioned (std 0.05 at width 3072 makes bf16 and fp32 disagree by ~60%).
    fp8 and stage as in load_flux_transformer: the same values as the whole model cut and cast
    afterwards, without ever holding the whole model (the other blocks' noise is drawn and dropped).
    """
    if std is None:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        std = 0.05 * (128 / width) ** 0.5
    with torch.device("meta"):  # allocate once, in the target dtype (full size: 24 GB in bf16, not 48 in fp32)
        model = FluxTransformer2DModel(**config)
    shapes = {name: p.shape for name, p in model.named_parameters()}  # the whole model's draw order
    torch.nn.Module.to(model, dtype)  # ModelMixin.to warns about fp32-kept modules; Flux has none
    if stage is not None:
        keep_stage(model, *stage)
    if fp8:
        store_blocks_fp8(model)
    model.to_empty(device=device)  # every parameter is overwritten below; Flux has no buffers
    params = dict(model.named_parameters())
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        if name in params:  # RMSNorm scales stay near 1 so attention logits are neither zero nor huge
            params[name].copy_((1 + 2 * noise if ".norm_" in name else noise).to(dtype))
    return model.eval().requires_grad_(False)
