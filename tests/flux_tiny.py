"""Tiny random Flux.1 transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from comfy_xdit.models.flux_checkpoint import PREFIX, diffusers_to_bfl, rope_axes_for_head_dim


def tiny_flux_config(**overrides) -> dict:
    """FluxTransformer2DModel kwargs for a ~2M-parameter model; rope axes follow the head size unless given."""
    cfg = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
               attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
               guidance_embeds=True)
    cfg.update(overrides)
    cfg.setdefault("axes_dims_rope", rope_axes_for_head_dim(cfg["attention_head_dim"]))
    return cfg


def make_tiny_flux(seed=0, **overrides):
    """Eval-mode fp32 FluxTransformer2DModel with every parameter randomised (norm scales too)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**tiny_flux_config(**overrides))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.05
            # RMSNorm scales stay near 1 so attention logits are neither zero nor huge
            p.copy_(1 + 2 * noise if ".norm_" in name else noise)
    return model.eval().requires_grad_(False)


def write_flux_checkpoint(model, path, layout="bfl", dtype=None):
    """Save ``model`` as a single-file checkpoint: 'bfl', 'comfy' (BFL under model.diffusion_model.) or 'diffusers'."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout in ("bfl", "comfy"):
        sd = diffusers_to_bfl(sd)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    prefix = PREFIX if layout == "comfy" else ""
    # clone: save_file rejects tensors that share storage
    sd = {prefix + k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}
    save_file(sd, os.fspath(path))
    return path
