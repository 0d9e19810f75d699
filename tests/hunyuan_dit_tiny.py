"""Tiny random HunyuanDiT transformers, checkpoint writers and conditioning, shared by tests."""

from __future__ import annotations

import os

import torch

from comfy_xdit.models.hunyuan_dit import HUNYUAN_DIT
from comfy_xdit.models.hunyuan_dit.checkpoint import write_hunyuan_dit_checkpoint

TINY_PRESETS = ("tiny-hunyuan-dit", "tiny-hunyuan-dit-v1.1")


def make_tiny_hunyuan_dit(preset="tiny-hunyuan-dit", seed=0, dtype=torch.float32, **overrides):
    return HUNYUAN_DIT.random(dict(HUNYUAN_DIT.preset_config(preset), **overrides), seed=seed, dtype=dtype)


def tiny_hunyuan_dit_checkpoint(directory, preset="tiny-hunyuan-dit", seed=0, layout="hydit", dtype=None,
                                scaled_fp8=False, **overrides):
    """Write a tiny random HunyuanDiT to directory/<preset>-<layout>[-tag].safetensors; returns (path, model)."""
    model = make_tiny_hunyuan_dit(preset, seed=seed, **overrides)
    tag = "-scaled" if scaled_fp8 else f"-{str(dtype).split('.')[-1]}" if dtype is not None else ""
    path = os.path.join(directory, f"{preset}-{layout}{tag}.safetensors")
    write_hunyuan_dit_checkpoint(model, path, layout=layout, dtype=dtype, scaled_fp8=scaled_fp8)
    return path, model


def hunyuan_dit_cond(config: dict, batch: int, generator, bert_len: int | None = None, t5_len: int | None = None,
                     real: tuple[int, int] | None = None, meta: tuple | None = None) -> dict:
    """Conditioning as the workers take it (ComfyUI's HunyuanDiT text encoders' outputs): BERT states context
    [batch, bert_len, cross_attention_dim] and mT5 states [batch, t5_len, cross_attention_dim_t5] (default: the
    model's text lengths), each with a mask [batch, len]: 1 for the first real = (bert, mT5) tokens, 0 for the
    padding after them (default: no padding). meta: image_meta_size (height, width, target height, target width,
    crop top, crop left) in pixels."""
    bert_len = bert_len or config["text_len"]
    t5_len = t5_len or config["text_len_t5"]
    real = real or (bert_len, t5_len)
    cond = {"context": torch.randn(batch, bert_len, config["cross_attention_dim"], generator=generator),
            "encoder_hidden_states_t5": torch.randn(batch, t5_len, config["cross_attention_dim_t5"],
                                                    generator=generator),
            "text_embedding_mask": (torch.arange(bert_len) < real[0]).long().repeat(batch, 1),
            "text_embedding_mask_t5": (torch.arange(t5_len) < real[1]).long().repeat(batch, 1)}
    if meta is not None:
        cond["image_meta_size"] = torch.tensor([list(map(float, meta))])
    return cond
