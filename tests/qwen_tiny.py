"""Tiny random Qwen-Image transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

import os

import torch

from comfy_xdit.models.qwen import QWEN
from comfy_xdit.models.qwen.checkpoint import write_qwen_checkpoint

TINY = "tiny-qwen-image"


def make_tiny_qwen(seed=0, dtype=torch.float32, **overrides):
    return QWEN.random(dict(QWEN.preset_config(TINY), **overrides), seed=seed, dtype=dtype)


def tiny_qwen_checkpoint(directory, seed=0, layout="diffusers", dtype=None, scaled_fp8=False, **overrides):
    """Write a tiny random Qwen-Image to directory/tiny-qwen-<layout>[-tag].safetensors; returns (path, model)."""
    model = make_tiny_qwen(seed=seed, **overrides)
    tag = "-scaled" if scaled_fp8 else f"-{str(dtype).split('.')[-1]}" if dtype is not None else ""
    path = os.path.join(directory, f"tiny-qwen-{layout}{tag}.safetensors")
    write_qwen_checkpoint(model, path, layout=layout, dtype=dtype, scaled_fp8=scaled_fp8)
    return path, model


def qwen_cond(config: dict, batch: int, text_len: int, generator, refs: tuple = ()) -> dict:
    """Conditioning as the workers take it: context [batch, text_len, joint_attention_dim], and for Edit one
    VAE-space reference latent [1, 16, 1, h, w] per (h, w) in refs, numbered as the Sampler (xDiT) sends them."""
    cond = {"context": torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator)}
    for i, (h, w) in enumerate(refs):
        cond[f"ref_latents.{i}"] = torch.randn(1, 16, 1, h, w, generator=generator)
    return cond
