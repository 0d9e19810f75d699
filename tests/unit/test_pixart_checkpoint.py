"""PixArt-α / PixArt-Σ checkpoints: the original <-> diffusers renaming both ways (fused qkv / kv_linear rows in
order), every layout and storage loads to the written weights, the config and release come from the header's
shapes as ComfyUI's detection reads them, a PipeFusion stage reads only its tensors, bad files fail clearly, and
LoRAs in both naming styles reach the same weights."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.models.checkpoint import COMFY_PREFIX, CheckpointError
from comfy_xdit.models.family import detect_family, read_info
from comfy_xdit.models.fp8 import FP8
from comfy_xdit.models.lora import model_shapes
from comfy_xdit.models.pixart import PIXART
from comfy_xdit.models.pixart.checkpoint import (detect_pixart_layout, diffusers_from_original,
                                                 load_pixart_transformer, original_from_diffusers,
                                                 pixart_config_from_shapes, position_table, read_pixart_info)
from comfy_xdit.models.pixart.random import PIXART_PRESETS
from tests.pixart_tiny import TINY_PRESETS, loaded_config, make_tiny_pixart, tiny_pixart_checkpoint
from tests.sd3_tiny import recording_reads

FULL = [p for p in PIXART_PRESETS if not p.startswith("tiny")]


def _linear_weights(model) -> set:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


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
    """diffusers -> original fuses to_q/to_k/to_v into attn.qkv and to_k/to_v into cross_attn.kv_linear, rows in
    that order; original -> diffusers splits them back exactly, and is the inverse the other way round too."""
    model = make_tiny_pixart(preset, seed=1)
    sd = model.state_dict()
    orig = original_from_diffusers(sd)
    width = PIXART.width(model.config)
    qkv, kv = orig["blocks.1.attn.qkv.weight"], orig["blocks.1.cross_attn.kv_linear.bias"]
    assert qkv.shape == (3 * width, width) and kv.shape == (2 * width,)
    assert torch.equal(qkv[width:2 * width], sd["transformer_blocks.1.attn1.to_k.weight"])
    assert torch.equal(kv[width:], sd["transformer_blocks.1.attn2.to_v.bias"])
    assert torch.equal(orig["final_layer.scale_shift_table"], sd["scale_shift_table"])
    assert torch.equal(orig["t_block.1.weight"], sd["adaln_single.linear.weight"])
    assert ("csize_embedder.mlp.0.weight" in orig) == (preset == "tiny-pixart-alpha")
    assert not any(k.startswith("transformer_blocks.") for k in orig)
    back = diffusers_from_original(orig)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    again = original_from_diffusers(back)
    assert set(again) == set(orig) and all(torch.equal(again[k], orig[k]) for k in orig)
    # the tensors the released files carry beside the weights are dropped; the rest must be known
    extras = {"y_embedder.y_embedding": torch.zeros(120, 64), "pos_embed": torch.zeros(1, 16, width)}
    assert set(diffusers_from_original({**orig, **extras})) == set(sd)
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.0.attn.lora"):
        diffusers_from_original({**orig, "blocks.0.attn.lora.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no original PixArt name"):
        original_from_diffusers({**sd, "transformer_blocks.0.norm9.weight": torch.zeros(1)})


def test_renaming_runs_on_meta_tensors():
    meta = PIXART.meta_model(PIXART.preset_config("pixart-alpha-xl-2-1024")).state_dict()
    orig = original_from_diffusers(meta)
    assert orig["blocks.27.attn.qkv.weight"].shape == (3456, 1152) and len(orig) == len(meta) - 2 * 28 * 3
    back = diffusers_from_original(orig)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in meta.items()}


# --- layouts, storage, header --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("layout", ["pixart", "comfy", "diffusers"])
def test_round_trip_every_layout(tmp_path, preset, layout):
    path, model = tiny_pixart_checkpoint(tmp_path, preset, seed=3, layout=layout)
    raw = load_file(path)
    assert all(k.startswith(COMFY_PREFIX) for k in raw) == (layout == "comfy")
    family, found = detect_family(path)
    assert family is PIXART and found == ("diffusers" if layout == "diffusers" else "pixart")
    loaded, info = load_pixart_transformer(path, dtype=torch.float32)
    assert info.config == loaded_config(PIXART.preset_config(preset), layout)
    assert info.variant == ("pixart-alpha" if preset.endswith("alpha") else "pixart-sigma")
    assert info.stored_dtypes == {"float32"} and not info.scaled_fp8
    _same(loaded.state_dict(), model.state_dict())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert not loaded.pos_embed.pos_embed.is_meta  # diffusers' computed table is real


def test_config_and_family_from_the_header_alone(tmp_path):
    path, _ = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-sigma", layout="comfy")
    with recording_reads() as read:
        family, info = read_info(path)
        assert detect_family(path) == (PIXART, "pixart")
    assert read == {}  # no tensor was read
    assert family is PIXART and info.config == PIXART.preset_config("tiny-pixart-sigma")
    assert info.path == os.fspath(path) and info.layout == "pixart"


def test_position_table_as_comfyui_reads_it(tmp_path):
    """ComfyUI: input size = sqrt(pos_embed tokens) * 2, interpolation = input size // 64 (a fixed one); no table
    (or one under 64 latent pixels, where ComfyUI would divide by zero): each latent's own."""
    assert position_table(4096, 2) == (128, 2) and position_table(16384, 2) == (256, 4)
    assert position_table(1024, 2) == (64, 1) and position_table(256, 2) == (32, None)
    assert position_table(None, 2) == (128, None)
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-alpha", layout="pixart")
    raw = load_file(path)
    assert "pos_embed" not in raw and raw["y_embedder.y_embedding"].shape == (120, 64)
    save_file({**raw, "pos_embed": torch.zeros(1, 16384, 288)}, path)  # a 2048 px model's table
    config = read_pixart_info(path).config
    assert (config["sample_size"], config["interpolation_scale"]) == (256, 4)
    loaded, _ = load_pixart_transformer(path, dtype=torch.float32)
    _same(loaded.state_dict(), model.state_dict())  # the table is read for the config, never loaded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FP8])
def test_storage_dtypes(tmp_path, dtype):
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-alpha", seed=4, dtype=dtype, extras=False)
    assert read_pixart_info(path).stored_dtypes == {str(dtype).split(".")[-1]}
    loaded, _ = load_pixart_transformer(path, dtype=torch.float32)
    got = loaded.state_dict()
    stored = diffusers_from_original(load_file(path))
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, stored[k].float()), k  # the stored values, widened
    _same(got, model.state_dict(), tol=0.07 if dtype == FP8 else 0.01)
    bf16, _ = load_pixart_transformer(path)  # the default compute dtype: every tensor bf16
    assert {v.dtype for v in bf16.state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("layout", ["pixart", "comfy", "diffusers"])
def test_scaled_fp8_loads_dequantised(tmp_path, layout):
    """ComfyUI's scaled fp8: each Linear's fp8 weight times its scale_weight (a fused qkv / kv_linear has one,
    and is split after dequantising); the marker, scales and scale_input never reach the model."""
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-sigma", seed=5, layout=layout, scaled_fp8=True)
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    raw = load_file(path)
    assert raw[prefix + "scaled_fp8"].dtype == FP8
    for k in [k for k in raw if k.endswith(".scale_weight")]:  # ComfyUI's files also carry a scale_input
        raw[k[:-len("scale_weight")] + "scale_input"] = torch.ones(())
    save_file(raw, path)
    info = read_pixart_info(path)
    assert info.scaled_fp8 and info.config == loaded_config(PIXART.preset_config("tiny-pixart-sigma"), layout)
    loaded, _ = load_pixart_transformer(path, dtype=torch.float32)
    got, orig = loaded.state_dict(), model.state_dict()
    assert set(got) == set(orig)
    fused = "blocks.0.attn.qkv" if layout != "diffusers" else "transformer_blocks.0.attn1.to_q"
    q, s = raw[prefix + fused + ".weight"], raw[prefix + fused + ".scale_weight"]
    assert q.dtype == FP8 and s.numel() == 1
    assert torch.equal(got["transformer_blocks.0.attn1.to_q.weight"], (q.float() * s.float())[:288])
    if layout != "diffusers":
        assert torch.equal(got["transformer_blocks.0.attn1.to_v.weight"], (q.float() * s.float())[576:])
    linear = _linear_weights(model)
    for k, w in orig.items():
        if k in linear:
            bound = w.abs() * 2 ** -4 + w.abs().max() / 448 * 2 ** -6 * 3  # 3 mantissa bits; a fused scale's range
        elif k[:-len("bias")] + "weight" in linear:  # Linear biases: plain fp8
            bound = w.abs() * 2 ** -4 + 2 ** -10
        else:
            bound = torch.zeros_like(w)
        assert ((got[k] - w).abs() <= bound * 1.0001 + 1e-12).all(), k
    fp8, _ = load_pixart_transformer(path, dtype=torch.float32, fp8=True)  # fp8 storage of the dequantised weights
    w = fp8.transformer_blocks[0].attn1.to_k.weight
    assert w.dtype == FP8 and torch.equal(w.view(torch.uint8), got["transformer_blocks.0.attn1.to_k.weight"]
                                          .to(FP8).view(torch.uint8))


def test_fp8_keeps_the_blocks_linear_weights_in_fp8(tmp_path):
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-alpha", seed=6)
    loaded, _ = load_pixart_transformer(path, dtype=torch.bfloat16, fp8=True)
    got, orig = loaded.state_dict(), model.state_dict()
    in_blocks = {k for k in _linear_weights(model) if k.startswith("transformer_blocks.")}
    assert len(in_blocks) == 2 * 10  # attn1 q/k/v/out, attn2 q/k/v/out, ff in/out
    for k, v in got.items():
        if k in in_blocks:
            assert v.dtype == FP8 and torch.equal(v.view(torch.uint8), orig[k].to(FP8).view(torch.uint8)), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, orig[k].to(torch.bfloat16)), k


def _stage_keys(keys, start, stop, n) -> set:
    """A stage's diffusers keys, written out independently of BlockLayout."""
    out = set()
    for k in keys:
        if k.startswith("transformer_blocks."):
            keep = start <= int(k.split(".")[1]) < stop
        elif k.startswith("pos_embed."):
            keep = start == 0
        elif k.startswith("proj_out."):
            keep = stop == n
        else:  # adaln_single, caption_projection (every block), the head's scale_shift_table
            keep = True
        if keep:
            out.add(k)
    return out


@pytest.mark.parametrize("stage", [(0, 1), (1, 3)])
def test_stage_loads_and_reads_only_its_tensors(tmp_path, stage):
    start, stop = stage
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-sigma", seed=7, layout="comfy")
    others = {"vae.decoder.conv_in.weight": torch.zeros(8, 4), "text_encoders.t5xxl.shared.weight": torch.zeros(8)}
    save_file({**load_file(path), **others}, path)  # a full checkpoint: VAE and text encoder beside
    orig = model.state_dict()
    want = _stage_keys(orig, start, stop, 3)
    with recording_reads() as read:
        part, _ = load_pixart_transformer(path, dtype=torch.float32, stage=stage)
    files = {COMFY_PREFIX + k for k in original_from_diffusers({k: orig[k] for k in want})}
    assert set(read) == files  # one read per fused tensor, never the VAE's, the text encoder's, pos_embed
    _same(part.state_dict(), {k: orig[k] for k in want})
    blocks = part.transformer_blocks
    assert all(isinstance(b, torch.nn.Identity) == (not start <= i < stop) for i, b in enumerate(blocks))
    assert part.adaln_single is not None and part.caption_projection is not None
    assert (part.pos_embed is not None) == (start == 0) and (part.proj_out is not None) == (stop == 3)


@pytest.mark.parametrize("preset", FULL)
def test_full_size_config_and_release_from_shapes(preset):
    config = PIXART.preset_config(preset)
    shapes = dict(PIXART.meta_model(config).state_dict())
    side = config["sample_size"] // 2
    got = pixart_config_from_shapes(shapes, pos_tokens=side * side)  # as the original file's pos_embed gives it
    assert got == config and PIXART.variant(got) == preset
    assert PIXART.num_heads(got) == 16 and PIXART.width(got) == 1152
    assert 0.6e9 < sum(v.numel() for v in shapes.values()) < 0.62e9  # PixArt's 0.6B
    plain = pixart_config_from_shapes(shapes)  # diffusers' layout: no table
    assert plain["interpolation_scale"] is None
    assert PIXART.variant(plain) == ("pixart-alpha" if "alpha" in preset else "pixart-sigma")


def test_truncated_and_empty_files(tmp_path):
    path, _ = tiny_pixart_checkpoint(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    _raises(path, "truncated", detect_family, PIXART.read_info, PIXART.load)
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    _raises(empty, "contains no tensors", PIXART.read_info, PIXART.load)


@pytest.mark.parametrize("other", ["wan", "qwen", "ltxv"])
def test_other_files_are_not_pixart(tmp_path, other):
    if other == "wan":  # Wan's original names share blocks.N.cross_attn.*
        from tests.wan_tiny import tiny_wan_checkpoint

        path = tiny_wan_checkpoint(tmp_path)[0]
    elif other == "qwen":
        from tests.qwen_tiny import tiny_qwen_checkpoint

        path = tiny_qwen_checkpoint(tmp_path)[0]
    else:  # LTX-Video's diffusers names share adaln_single and transformer_blocks.N.attn2, not pos_embed.proj
        path = tmp_path / "ltxv.safetensors"
        save_file({"adaln_single.linear.weight": torch.zeros(6, 1), "proj_in.weight": torch.zeros(1, 1),
                   "transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 1)}, path)
    assert detect_pixart_layout(list(load_file(path))) is None
    if other != "ltxv":
        assert detect_family(path)[0].name == other
    _raises(path, "does not look like a PixArt transformer", PIXART.read_info, PIXART.load)


def test_broken_pixart_files(tmp_path):
    path, model = tiny_pixart_checkpoint(tmp_path, "tiny-pixart-alpha")
    sd = load_file(path)

    def variant(name, out):
        p = tmp_path / f"{name}.safetensors"
        save_file(out, p)
        return p

    missing = variant("missing", {k: v for k, v in sd.items() if k != "blocks.1.cross_attn.kv_linear.weight"})
    _raises(missing, r"2 keys missing.*transformer_blocks\.1\.attn2\.to_k\.weight", PIXART.load)
    extra = variant("extra", {**sd, "blocks.0.attn.lora_down.weight": torch.zeros(2, 2)})
    _raises(extra, "unexpected keys", PIXART.read_info, PIXART.load)
    shape = variant("shape", {**sd, "blocks.1.mlp.fc2.weight": torch.zeros(288, 1000)})
    _raises(shape, "shapes do not fit", PIXART.load)
    uneven = variant("uneven", {**sd, "blocks.1.attn.qkv.weight": torch.zeros(865, 288)})
    _raises(uneven, "equal parts", PIXART.read_info)
    kv_compress = variant("kv_compress", {**sd, "blocks.0.attn.sr.weight": torch.zeros(288, 1, 2, 2),
                                          "blocks.0.attn.norm.weight": torch.zeros(288)})
    assert detect_family(kv_compress)[0] is PIXART  # a PixArt, of a kind neither ComfyUI nor diffusers runs
    _raises(kv_compress, "KV token compression", PIXART.read_info, PIXART.load)
    odd_width = variant("odd_width", {**{k: v for k, v in sd.items() if not k.startswith("x_embedder")},
                                      "x_embedder.proj.weight": torch.zeros(280, 4, 2, 2),
                                      "x_embedder.proj.bias": torch.zeros(280)})
    _raises(odd_width, "multiple of PixArt's attention head size 72", PIXART.read_info)


# --- LoRAs ----------------------------------------------------------------------------------------------------


def _lora(path, entries: dict):
    save_file(entries, path)
    return path


def test_lora_in_original_and_diffusers_names_patch_the_same_weights(tmp_path):
    """A kohya LoRA on the original fused qkv splits by rows into to_q / to_k / to_v; a diffusers-named one on
    to_k patches to_k alone; a kv_linear LoRA reaches attn2's to_k / to_v."""
    model = make_tiny_pixart("tiny-pixart-alpha")
    shapes = model_shapes(model)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 288, generator=g), torch.randn(3 * 288, 4, generator=g)
    kohya = _lora(tmp_path / "kohya.safetensors", {"lora_unet_blocks_1_attn_qkv.lora_down.weight": down,
                                                    "lora_unet_blocks_1_attn_qkv.lora_up.weight": up,
                                                    "lora_unet_blocks_1_attn_qkv.alpha": torch.tensor(2.0)})
    parsed = PIXART.load_lora(kohya, shapes)
    assert set(parsed) == {f"transformer_blocks.1.attn1.to_{x}.weight" for x in "qkv"}
    k = parsed["transformer_blocks.1.attn1.to_k.weight"]
    assert k.scale == 0.5 and torch.equal(k.up, up[288:576]) and torch.equal(k.down, down)
    peft = _lora(tmp_path / "peft.safetensors", {
        "transformer.transformer_blocks.1.attn1.to_k.lora_A.weight": down,
        "transformer.transformer_blocks.1.attn1.to_k.lora_B.weight": up[288:576]})
    (only,) = PIXART.load_lora(peft, shapes).items()
    assert only[0] == "transformer_blocks.1.attn1.to_k.weight" and torch.equal(only[1].up, k.up)
    kv = _lora(tmp_path / "kv.safetensors", {
        "diffusion_model.blocks.0.cross_attn.kv_linear.lora_down.weight": down,
        "diffusion_model.blocks.0.cross_attn.kv_linear.lora_up.weight": up[:576]})
    assert set(PIXART.load_lora(kv, shapes)) == {"transformer_blocks.0.attn2.to_k.weight",
                                                  "transformer_blocks.0.attn2.to_v.weight"}
    from comfy_xdit.models.lora import LoraError

    sdxl = _lora(tmp_path / "sdxl.safetensors", {"lora_unet_input_blocks_1_0_proj.lora_down.weight": down,
                                                  "lora_unet_input_blocks_1_0_proj.lora_up.weight": up})
    with pytest.raises(LoraError, match="SD1.x/SDXL"):
        PIXART.load_lora(sdxl, shapes)
