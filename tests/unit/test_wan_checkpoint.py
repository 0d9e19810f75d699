"""Wan 2.1 / 2.2 checkpoints: every layout and storage loads to the written weights, the config and release
come from shapes, bad files fail clearly, and the forward equals diffusers' own WanTransformer3DModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.models.checkpoint import CheckpointError
from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.family import detect_family, read_info
from comfy_xdit.models.fp8 import FP8
from comfy_xdit.models.wan import WAN, WAN21_LATENT, WAN22_LATENT
from comfy_xdit.models.wan.checkpoint import (load_wan_transformer, original_from_diffusers, read_wan_info,
                                              wan_config_from_shapes)
from comfy_xdit.models.wan.random import WAN_PRESETS
from tests.wan_tiny import TINY_PRESETS, make_tiny_wan, tiny_wan_checkpoint, wan_cond


def _same(got, want, tol=0.0):
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k].float() - b[k].float()).abs().max() <= tol * (1 + b[k].float().abs().max()), k


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("layout", ["wan", "comfy", "diffusers"])
def test_round_trip_every_layout(tmp_path, preset, layout):
    path, model = tiny_wan_checkpoint(tmp_path, preset, seed=3, layout=layout)
    family, found = detect_family(path)
    assert family is WAN and found == ("diffusers" if layout == "diffusers" else "wan")
    loaded, info = load_wan_transformer(path, dtype=torch.float32)
    assert info.config == dict(WAN.preset_config(preset), patch_size=(1, 2, 2))
    _same(loaded, model)


def test_original_keys_are_the_converters_inverse(tmp_path):
    """The 'wan' layout is what diffusers' converter reads: its output names are the model's own."""
    model = make_tiny_wan("tiny-wan-i2v")
    original = original_from_diffusers(model.state_dict())
    assert "head.modulation" in original and "blocks.0.self_attn.q.weight" in original
    assert "blocks.0.norm3.weight" in original and "img_emb.proj.1.weight" in original  # the cross-attn norm
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    back = convert_wan_transformer_to_diffusers(dict(original))
    assert set(back) == set(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FP8])
def test_storage_dtypes(tmp_path, dtype):
    path, model = tiny_wan_checkpoint(tmp_path, "tiny-wan-t2v", seed=4, dtype=dtype)
    assert read_info(path)[1].stored_dtypes == {str(dtype).split(".")[-1]}
    loaded, _ = load_wan_transformer(path, dtype=torch.float32)
    _same(loaded, model, tol=0.07 if dtype == FP8 else 0.01)


@pytest.mark.parametrize("layout", ["wan", "comfy"])
def test_scaled_fp8_loads_dequantised(tmp_path, layout):
    """ComfyUI's scaled fp8: each Linear's fp8 weight times its scale_weight, the marker ignored."""
    path, model = tiny_wan_checkpoint(tmp_path, "tiny-wan-t2v", seed=5, layout=layout, scaled_fp8=True)
    raw = load_file(path)
    prefix = "model.diffusion_model." if layout == "comfy" else ""
    assert raw[prefix + "scaled_fp8"].dtype == FP8
    q, s = raw[prefix + "blocks.0.self_attn.q.weight"], raw[prefix + "blocks.0.self_attn.q.scale_weight"]
    assert q.dtype == FP8 and s.numel() == 1
    info = read_wan_info(path)
    assert info.scaled_fp8 and info.config == dict(WAN.preset_config("tiny-wan-t2v"), patch_size=(1, 2, 2))
    loaded, _ = load_wan_transformer(path, dtype=torch.float32)
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, q.float() * s.float())
    _same(loaded, model, tol=0.07)  # fp8's 3 mantissa bits, scaled to the weight's range
    fp8, _ = load_wan_transformer(path, dtype=torch.float32, fp8=True)  # fp8 storage of the dequantised weights
    assert fp8.blocks[0].attn1.to_q.weight.dtype == FP8


@pytest.mark.parametrize("preset", [p for p in WAN_PRESETS if not p.startswith("tiny")])
def test_full_size_config_and_release_from_shapes(preset):
    config = WAN.preset_config(preset)
    meta = WAN.meta_model(config)
    shapes = dict(meta.state_dict())
    assert wan_config_from_shapes(shapes) == dict(config, patch_size=(1, 2, 2))
    assert WAN.variant(config) == preset


def test_bad_files(tmp_path):
    path, model = tiny_wan_checkpoint(tmp_path, "tiny-wan-t2v")
    sd = load_file(path)
    broken = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "blocks.1.ffn.2.weight"}, broken)
    with pytest.raises(CheckpointError, match="missing.*ffn.net.2"):
        load_wan_transformer(broken)
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "blocks.0.lora_down.weight": torch.zeros(2, 2)}, extra)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_wan_transformer(extra)
    bad = tmp_path / "bad.safetensors"
    save_file({**sd, "blocks.0.ffn.0.weight": torch.zeros(3, 512)}, bad)
    with pytest.raises(CheckpointError, match="shapes"):
        load_wan_transformer(bad)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_forward_equals_diffusers(preset):
    """The family's decomposed forward (prologue, our attention processor, head, unpatchify) against diffusers'
    own forward with its own processor (I2V: 512 text tokens, the length diffusers' processor assumes)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = make_tiny_wan(preset, seed=6)
    config = dict(model.config)
    dit = DiTModel(WAN, model)
    fmt = WAN.latent_format_for(config)
    g = torch.Generator().manual_seed(1)
    shape = (2, fmt.channels, 3, 4, 6)
    x = torch.randn(*shape, generator=g)
    cond = wan_cond(config, 2, 512 if preset == "tiny-wan-i2v" else 7, shape, g)
    cond = WAN.prepare_conditioning(config, cond, shape)
    sigma = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        got = dit.forward(x, sigma, cond)
        for block in model.blocks:
            block.attn1.set_processor(WanAttnProcessor())
            block.attn2.set_processor(WanAttnProcessor())
        xin = torch.cat([x, cond["concat"]], 1) if "concat" in cond else x
        clip = cond.get("clip_fea")
        want = model(xin, sigma * 1000, cond["context"], None if clip is None else clip.expand(2, -1, -1),
                     return_dict=False)[0]
    assert got.shape == shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_i2v_concat_as_comfyui():
    """WAN21.concat_cond: [4 mask channels (1 - concat_mask) | the image latent in model space]."""
    config = WAN.preset_config("tiny-wan-i2v")
    g = torch.Generator().manual_seed(2)
    shape = (2, 16, 3, 4, 6)
    cond = WAN.prepare_conditioning(config, wan_cond(config, 1, 5, shape, g), shape)
    concat = cond["concat"]
    assert concat.shape == (2, 20, 3, 4, 6) and "concat_latent_image" not in cond
    assert torch.equal(concat[:, :4, 0], torch.ones(2, 4, 4, 6)) and torch.equal(concat[:, :4, 1:], torch.zeros(2, 4, 2, 4, 6))
    t2v = WAN.prepare_conditioning(WAN.preset_config("tiny-wan-t2v"), {"context": torch.zeros(1, 3, 64)}, shape)
    assert "concat" not in t2v
    plain = WAN.prepare_conditioning(config, {"context": torch.zeros(1, 3, 64)}, shape)  # I2V without an image
    assert torch.equal(plain["concat"], torch.zeros(2, 20, 3, 4, 6))


def test_latent_formats_and_checks():
    x = torch.randn(1, 16, 2, 3, 4)
    assert torch.allclose(WAN21_LATENT.from_model(WAN21_LATENT.to_model(x)), x, atol=1e-6)
    mean, std = torch.tensor(WAN21_LATENT.mean), torch.tensor(WAN21_LATENT.std)
    assert torch.allclose(WAN21_LATENT.to_model(x), (x - mean.view(1, 16, 1, 1, 1)) / std.view(1, 16, 1, 1, 1))
    assert len(WAN22_LATENT.mean) == len(WAN22_LATENT.std) == 48
    t2v, ti2v = WAN.preset_config("tiny-wan-t2v"), WAN.preset_config("tiny-wan-ti2v")
    WAN.check_latent(t2v, (1, 16, 3, 4, 6))
    with pytest.raises(ValueError, match="video latents"):
        WAN.check_latent(t2v, (1, 16, 4, 6))
    with pytest.raises(ValueError, match="48-channel"):
        WAN.check_latent(ti2v, (1, 16, 3, 4, 6))
    with pytest.raises(ValueError, match="multiples of 16 px"):
        WAN.check_latent(t2v, (1, 16, 3, 5, 6))
    assert WAN.model_sampling(t2v, (1, 16, 3, 4, 6)).shift == 8.0
