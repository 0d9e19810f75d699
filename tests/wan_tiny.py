"""Tiny random Wan transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

import os

import torch

from comfy_xdit.models.wan import WAN
from comfy_xdit.models.wan.checkpoint import write_wan_checkpoint

TINY_PRESETS = ("tiny-wan-t2v", "tiny-wan-i2v", "tiny-wan-ti2v")


def make_tiny_wan(preset="tiny-wan-t2v", seed=0, dtype=torch.float32, **overrides):
    return WAN.random(dict(WAN.preset_config(preset), **overrides), seed=seed, dtype=dtype)


def tiny_wan_checkpoint(directory, preset="tiny-wan-t2v", seed=0, layout="wan", dtype=None, scaled_fp8=False,
                        **overrides):
    """Write a tiny random Wan to directory/<preset>-<layout>.safetensors; returns (path, model)."""
    model = make_tiny_wan(preset, seed=seed, **overrides)
    tag = "-scaled" if scaled_fp8 else f"-{str(dtype).split('.')[-1]}" if dtype is not None else ""
    path = os.path.join(directory, f"{preset}-{layout}{tag}.safetensors")
    write_wan_checkpoint(model, path, layout=layout, dtype=dtype, scaled_fp8=scaled_fp8)
    return path, model


def wan_cond(config: dict, batch: int, text_len: int, latent_shape: tuple, generator) -> dict:
    """Conditioning as the workers take it: context, and for I2V models clip_fea plus ComfyUI's
    concat_latent_image / concat_mask (WanImageToVideo's: the first latent frame given, the rest generated)."""
    cond = {"context": torch.randn(batch, text_len, config["text_dim"], generator=generator)}
    extra = config["in_channels"] - latent_shape[1]
    if extra:
        b, c, t, h, w = latent_shape
        cond["clip_fea"] = torch.randn(1, 257, config["image_dim"], generator=generator)
        cond["concat_latent_image"] = torch.randn(1, c, t, h, w, generator=generator)
        mask = torch.ones(1, 1, t, h, w)
        mask[:, :, :1] = 0.0
        cond["concat_mask"] = mask
    return cond
