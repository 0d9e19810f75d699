"""Tiny random PixArt transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

import os

import torch

from comfy_xdit.models.pixart import PIXART
from comfy_xdit.models.pixart.checkpoint import write_pixart_checkpoint

TINY_PRESETS = ("tiny-pixart-alpha", "tiny-pixart-sigma")


def make_tiny_pixart(preset="tiny-pixart-alpha", seed=0, dtype=torch.float32, **overrides):
    return PIXART.random(dict(PIXART.preset_config(preset), **overrides), seed=seed, dtype=dtype)


def tiny_pixart_checkpoint(directory, preset="tiny-pixart-alpha", seed=0, layout="pixart", dtype=None,
                           scaled_fp8=False, extras=True, **overrides):
    """Write a tiny random PixArt to directory/<preset>-<layout>[-tag].safetensors; returns (path, model)."""
    model = make_tiny_pixart(preset, seed=seed, **overrides)
    tag = "-scaled" if scaled_fp8 else f"-{str(dtype).split('.')[-1]}" if dtype is not None else ""
    path = os.path.join(directory, f"{preset}-{layout}{tag}.safetensors")
    write_pixart_checkpoint(model, path, layout=layout, dtype=dtype, scaled_fp8=scaled_fp8, extras=extras)
    return path, model


def loaded_config(config: dict, layout: str) -> dict:
    """The config a file of this layout gives back: the fixed position interpolation only travels in an original
    file's pos_embed table (diffusers' layout has none, so ComfyUI derives it from each latent)."""
    return dict(config, interpolation_scale=None) if layout == "diffusers" else dict(config)


def pixart_cond(config: dict, batch: int, text_len: int, generator, size: tuple | None = None) -> dict:
    """Conditioning as the workers take it: T5 states context [batch, text_len, caption_channels]; size
    (height, width) in pixels adds the micro-conditions CLIPTextEncodePixArtAlpha sets (c_size, c_ar)."""
    cond = {"context": torch.randn(batch, text_len, config["caption_channels"], generator=generator)}
    if size is not None:
        cond["c_size"] = torch.tensor([[float(size[0]), float(size[1])]])
        cond["c_ar"] = torch.tensor([[size[0] / size[1]]])
    return cond
