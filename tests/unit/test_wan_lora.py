"""Wan LoRAs in the formats people train and share them in, parsed onto the diffusers model's weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.models.lora import LoraError, dense, model_shapes
from comfy_xdit.models.wan import WAN
from tests.wan_tiny import make_tiny_wan


@pytest.fixture(scope="module")
def shapes():
    return model_shapes(make_tiny_wan("tiny-wan-i2v"))


def _pair(out, name, fan_out, fan_in, rank=4, alpha=None, down=".lora_down.weight", up=".lora_up.weight", seed=0):
    g = torch.Generator().manual_seed(seed)
    out[name + down] = torch.randn(rank, fan_in, generator=g)
    out[name + up] = torch.randn(fan_out, rank, generator=g)
    if alpha is not None:
        out[name + ".alpha"] = torch.tensor(float(alpha))
    return out[name + up] @ out[name + down] * ((alpha or rank) / rank)


def test_kohya_and_musubi_names_reach_the_diffusers_weights(tmp_path, shapes):
    sd = {}
    want = {
        "blocks.0.attn1.to_q.weight": _pair(sd, "lora_unet_blocks_0_self_attn_q", 512, 512, alpha=2, seed=1),
        "blocks.1.attn2.add_k_proj.weight": _pair(sd, "lora_unet_blocks_1_cross_attn_k_img", 512, 512, seed=2),
        "blocks.0.ffn.net.0.proj.weight": _pair(sd, "diffusion_model.blocks.0.ffn.0", 1024, 512, seed=3,
                                                down=".lora_A.weight", up=".lora_B.weight"),
        "proj_out.weight": _pair(sd, "diffusion_model.head.head", 64, 512, seed=4),
    }
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.full((512,), 0.5)  # LightX2V: the cross-attn norm (diffusers norm2)
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.full((512,), 0.25)
    path = tmp_path / "wan_lora.safetensors"
    save_file(sd, path)
    parsed = WAN.load_lora(path, shapes)
    got = {k: dense(p) for k, p in parsed.items()}
    assert set(got) == set(want) | {"blocks.0.norm2.weight", "blocks.0.attn1.to_q.bias"}
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert torch.equal(got["blocks.0.norm2.weight"], torch.full((512,), 0.5))


def test_diffusers_names(tmp_path, shapes):
    sd = {}
    delta = _pair(sd, "transformer.blocks.1.attn1.to_out.0", 512, 512, down=".lora_A.weight", up=".lora_B.weight")
    path = tmp_path / "wan_peft.safetensors"
    save_file(sd, path)
    parsed = WAN.load_lora(path, shapes)
    assert list(parsed) == ["blocks.1.attn1.to_out.0.weight"]
    assert torch.allclose(dense(parsed["blocks.1.attn1.to_out.0.weight"]), delta, atol=1e-5)


def test_foreign_lora_is_named(tmp_path, shapes):
    sd = {}
    _pair(sd, "lora_unet_double_blocks_0_img_attn_qkv", 9, 8)
    path = tmp_path / "flux_lora.safetensors"
    save_file(sd, path)
    with pytest.raises(LoraError, match="Flux.1"):
        WAN.load_lora(path, shapes)
