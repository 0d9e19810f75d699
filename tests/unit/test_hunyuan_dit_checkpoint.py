"""HunyuanDiT checkpoints: the original <-> diffusers renaming both ways (fused Wqkv / kv_proj rows in order, the
block norms' trade of names, the final modulation's swapped halves), every layout and storage loads to the written
weights, the config and release come from the header's shapes, a stage reads only its tensors, bad files fail
clearly, and detection finds the family among the others."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.models.checkpoint import COMFY_PREFIX, CheckpointError
from comfy_xdit.models.family import detect_family, read_info
from comfy_xdit.models.fp8 import FP8
from comfy_xdit.models.hunyuan_dit import HUNYUAN_DIT
from comfy_xdit.models.hunyuan_dit.checkpoint import (detect_hunyuan_dit_layout, diffusers_from_original,
                                                      hunyuan_dit_config_from_shapes, load_hunyuan_dit_transformer,
                                                      original_from_diffusers, read_hunyuan_dit_info)
from comfy_xdit.models.hunyuan_dit.random import HUNYUAN_DIT_PRESETS
from tests.hunyuan_dit_tiny import TINY_PRESETS, make_tiny_hunyuan_dit, tiny_hunyuan_dit_checkpoint
from tests.sd3_tiny import recording_reads

FULL = [p for p in HUNYUAN_DIT_PRESETS if not p.startswith("tiny")]


def _same(got: dict, want: dict, tol=0.0):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k].float() - want[k].float()).abs().max() <= tol * (1 + want[k].float().abs().max()), k


def _raises(path, match, *calls):
    for call in calls:
        with pytest.raises(CheckpointError, match=match) as e:
            call(path)
        assert str(e.value).startswith(os.fspath(path)), str(e.value)


# --- the renaming ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_renaming_both_ways(preset):
    model = make_tiny_hunyuan_dit(preset, seed=1)
    sd = model.state_dict()
    orig = original_from_diffusers(sd)
    width = HUNYUAN_DIT.width(model.config)
    qkv, kv = orig["blocks.1.attn1.Wqkv.weight"], orig["blocks.1.attn2.kv_proj.bias"]
    assert qkv.shape == (3 * width, width) and kv.shape == (2 * width,)
    assert torch.equal(qkv[width:2 * width], sd["blocks.1.attn1.to_k.weight"])
    assert torch.equal(kv[width:], sd["blocks.1.attn2.to_v.bias"])
    # the original norm3 (before cross-attention) is diffusers' norm2, its norm2 (before the MLP) diffusers' norm3
    assert torch.equal(orig["blocks.2.norm3.weight"], sd["blocks.2.norm2.weight"])
    assert torch.equal(orig["blocks.2.norm2.bias"], sd["blocks.2.norm3.bias"])
    # final modulation: (shift, scale) in the original, (scale, shift) in diffusers
    final = orig["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(final[:width], sd["norm_out.linear.weight"][width:])
    assert torch.equal(final[width:], sd["norm_out.linear.weight"][:width])
    # the second half's blocks carry the skip modules, the first half's do not
    n = model.config.num_layers
    assert f"blocks.{n // 2 + 1}.skip_linear.weight" in orig and f"blocks.{n // 2}.skip_linear.weight" not in orig
    assert ("style_embedder.weight" in orig) == model.config.use_style_cond_and_image_meta_size
    _same(diffusers_from_original(orig), sd)
    _same(original_from_diffusers(diffusers_from_original(orig)), orig)
    assert detect_hunyuan_dit_layout(orig) == "hydit" and detect_hunyuan_dit_layout(sd) == "diffusers"


def test_renaming_refuses_unknown_and_partial_keys():
    sd = make_tiny_hunyuan_dit(seed=1).state_dict()
    orig = original_from_diffusers(sd)
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.0.attn1.lora"):
        diffusers_from_original(dict(orig, **{"blocks.0.attn1.lora.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="no original HunyuanDiT name"):
        original_from_diffusers(dict(sd, extra=torch.zeros(1)))
    partial = {k: v for k, v in sd.items() if k != "blocks.0.attn1.to_v.weight"}
    with pytest.raises(CheckpointError, match="needs all of"):
        original_from_diffusers(partial)


# --- files -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("layout", ["hydit", "comfy", "diffusers"])
def test_every_layout_loads_the_written_weights(tmp_path, preset, layout):
    path, model = tiny_hunyuan_dit_checkpoint(tmp_path, preset, seed=2, layout=layout)
    keys = load_file(path)
    assert all(k.startswith(COMFY_PREFIX) for k in keys) == (layout == "comfy")
    family, found = detect_family(path)
    assert family is HUNYUAN_DIT and found == ("diffusers" if layout == "diffusers" else "hydit")
    loaded, info = HUNYUAN_DIT.load(path, dtype=torch.float32)
    assert info.config == dict(HUNYUAN_DIT.preset_config(preset)) == {k: loaded.config[k] for k in info.config}
    assert info.variant == "hunyuan-dit" and info.stored_dtypes == {"float32"} and not info.scaled_fp8
    _same(loaded.state_dict(), model.state_dict())
    assert read_info(path)[1].config == info.config


@pytest.mark.parametrize("layout", ["hydit", "diffusers"])
def test_storage_dtypes_and_scaled_fp8(tmp_path, layout):
    """bf16 and fp8 files load to the rounded weights; ComfyUI's scaled fp8 (one scale per fused Wqkv / kv_proj
    in the original layout) loads dequantised, close to the weights; fp8=True keeps the blocks' Linears in fp8."""
    model = make_tiny_hunyuan_dit("tiny-hunyuan-dit-v1.1", seed=3)
    want = model.state_dict()
    for dtype, tol in ((torch.bfloat16, 1e-2), (FP8, 7e-2)):
        path, _ = tiny_hunyuan_dit_checkpoint(tmp_path, "tiny-hunyuan-dit-v1.1", seed=3, layout=layout, dtype=dtype)
        loaded, info = load_hunyuan_dit_transformer(path, dtype=torch.float32)
        assert info.stored_dtypes == {str(dtype).split(".")[-1]}
        _same(loaded.state_dict(), want, tol)
    path, _ = tiny_hunyuan_dit_checkpoint(tmp_path, "tiny-hunyuan-dit-v1.1", seed=3, layout=layout, scaled_fp8=True)
    raw = load_file(path)
    assert "scaled_fp8" in raw
    fused = "blocks.0.attn1.Wqkv.scale_weight" if layout == "hydit" else "blocks.0.attn1.to_k.scale_weight"
    assert fused in raw and raw[fused].shape == ()
    info = read_hunyuan_dit_info(path)
    assert info.scaled_fp8 and "float8_e4m3fn" in info.stored_dtypes
    loaded, _ = load_hunyuan_dit_transformer(path, dtype=torch.float32)
    _same(loaded.state_dict(), want, 7e-2)
    err = (loaded.blocks[0].attn1.to_q.weight - want["blocks.0.attn1.to_q.weight"]).abs().max()
    assert 0 < err < 0.07 * want["blocks.0.attn1.to_q.weight"].abs().max()
    kept, _ = load_hunyuan_dit_transformer(path, dtype=torch.float32, fp8=True)
    assert kept.blocks[0].attn1.to_q.weight.dtype == FP8 and kept.proj_out.weight.dtype == torch.float32


def test_a_stage_reads_only_its_tensors(tmp_path):
    path, model = tiny_hunyuan_dit_checkpoint(tmp_path, seed=4, layout="comfy")
    with recording_reads() as read:
        stage, _ = load_hunyuan_dit_transformer(path, dtype=torch.float32, stage=(0, 3))
    assert read and all(not k.startswith(COMFY_PREFIX + "blocks.") or int(k.split(".")[3]) < 3 for k in read)
    assert not any("final_layer" in k for k in read) and any("x_embedder" in k for k in read)
    assert isinstance(stage.blocks[4], torch.nn.Identity) and stage.norm_out is None
    assert torch.equal(stage.blocks[1].attn1.to_v.weight, model.blocks[1].attn1.to_v.weight)


# --- config and release from shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", FULL)
def test_full_size_config_from_shapes(preset):
    """The released shapes (on the meta device) give back the preset's config and the release's name; DiT-g/2's
    6144-wide MLP survives diffusers' int(width * mlp_ratio)."""
    config = HUNYUAN_DIT.preset_config(preset)
    model = HUNYUAN_DIT.meta_model(config)
    got = hunyuan_dit_config_from_shapes(model.state_dict())
    assert got == config
    assert model.blocks[0].ff.net[0].proj.out_features == 6144
    assert HUNYUAN_DIT.num_heads(got) == 16 and HUNYUAN_DIT.width(got) == 1408
    assert (got["text_len"], got["text_len_t5"], got["cross_attention_dim_t5"]) == (77, 256, 2048)
    assert HUNYUAN_DIT.variant(got) == preset
    # ComfyUI's test for v1.0 / v1.1: the extra embedder takes 1024 pooled + 6 x 256 size + 1408 style values
    extra = model.state_dict()["time_extra_emb.extra_embedder.linear_1.weight"].shape[1]
    assert extra == (3968 if config["use_style_cond_and_image_meta_size"] else 1024)


# --- bad files -----------------------------------------------------------------------------------------------------


def test_bad_files_fail_clearly(tmp_path):
    model = make_tiny_hunyuan_dit(seed=5)
    orig = {k: v.contiguous() for k, v in original_from_diffusers(model.state_dict()).items()}
    odd = tmp_path / "odd.safetensors"
    save_file({k: v for k, v in orig.items() if not k.startswith("blocks.5.")}, odd)
    _raises(odd, "5 blocks.*depth must be even", read_hunyuan_dit_info, load_hunyuan_dit_transformer)
    extra = tmp_path / "extra.safetensors"
    save_file(dict(orig, **{"blocks.0.attn1.sr.weight": torch.zeros(2)}), extra)
    _raises(extra, "unexpected keys.*attn1.sr", read_hunyuan_dit_info, load_hunyuan_dit_transformer)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in orig.items() if k != "blocks.4.skip_linear.weight"}, missing)
    _raises(missing, "keys missing.*blocks.4.skip_linear.weight", load_hunyuan_dit_transformer)
    noheads = tmp_path / "noheads.safetensors"
    save_file({k: v for k, v in orig.items() if "blocks.0.attn1.q_norm" not in k}, noheads)
    _raises(noheads, "key 'blocks.0.attn1.norm_q.weight' missing", read_hunyuan_dit_info)
    other = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(2)}, other)
    _raises(other, "does not look like a HunyuanDiT.*SD/SDXL UNet", read_hunyuan_dit_info)
    with pytest.raises(CheckpointError, match="Known families:.*HunyuanDiT"):
        detect_family(other)


def test_detection_tells_hunyuan_dit_from_pixart(tmp_path):
    from tests.pixart_tiny import tiny_pixart_checkpoint

    for layout in ("pixart", "diffusers"):
        path, _ = tiny_pixart_checkpoint(tmp_path, layout=layout)
        assert detect_family(path)[0].name == "pixart"
    model = make_tiny_hunyuan_dit(seed=6)
    for sd in (model.state_dict(), original_from_diffusers(model.state_dict())):
        from comfy_xdit.models.family import _families

        assert [f.name for f in _families() if f.detect(list(sd))] == ["hunyuan_dit"]
