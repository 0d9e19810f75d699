"""Qwen-Image checkpoints: both layouts and every storage load to the written weights, ComfyUI's scaled fp8 is
dequantised, the config comes from the header's shapes alone, a PipeFusion stage reads only its tensors, bad
files fail clearly; and the family's latent checks and Edit's reference-latent conditioning."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_xdit.models.checkpoint import COMFY_PREFIX, CheckpointError
from comfy_xdit.models.family import detect_family, read_info
from comfy_xdit.models.fp8 import FP8
from comfy_xdit.models.qwen import QWEN
from comfy_xdit.models.qwen.checkpoint import (detect_qwen_layout, load_qwen_transformer, qwen_config_from_shapes,
                                               read_qwen_info)
from tests.qwen_tiny import TINY, qwen_cond, tiny_qwen_checkpoint
from tests.sd3_tiny import recording_reads

CONFIG = QWEN.preset_config(TINY)
LINEAR = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
          "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def _linear_weights(model) -> set:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _same(got: dict, want: dict, tol=0.0):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k].float() - want[k].float()).abs().max() <= tol * (1 + want[k].float().abs().max()), k


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_round_trip_both_layouts(tmp_path, layout):
    path, model = tiny_qwen_checkpoint(tmp_path, seed=3, layout=layout)
    raw = load_file(path)
    assert all(k.startswith(COMFY_PREFIX) for k in raw) == (layout == "comfy")
    family, found = detect_family(path)
    assert family is QWEN and found == "diffusers"  # ComfyUI's files keep diffusers' names, under its prefix
    loaded, info = load_qwen_transformer(path, dtype=torch.float32)
    assert info.config == CONFIG and info.variant == "qwen-image" and not info.scaled_fp8
    assert info.stored_dtypes == {"float32"}
    _same(loaded.state_dict(), model.state_dict())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_config_and_family_from_the_header_alone(tmp_path):
    path, _ = tiny_qwen_checkpoint(tmp_path, layout="comfy")
    with recording_reads() as read:
        family, info = read_info(path)
        assert detect_family(path) == (QWEN, "diffusers")
    assert read == {}  # no tensor was read
    assert family is QWEN and info.config == CONFIG and info.path == os.fspath(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, FP8])
def test_storage_dtypes(tmp_path, dtype):
    path, model = tiny_qwen_checkpoint(tmp_path, seed=4, dtype=dtype)
    assert read_qwen_info(path).stored_dtypes == {str(dtype).split(".")[-1]}
    stored = load_file(path)
    loaded, _ = load_qwen_transformer(path, dtype=torch.float32)
    got = loaded.state_dict()
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, stored[k].float()), k  # the stored values, widened
    _same(got, model.state_dict(), tol=0.07 if dtype == FP8 else 0.01)
    bf16, _ = load_qwen_transformer(path)  # the default compute dtype: every tensor bf16
    assert {v.dtype for v in bf16.state_dict().values()} == {torch.bfloat16}


@pytest.mark.parametrize("layout", ["diffusers", "comfy"])
def test_scaled_fp8_loads_dequantised(tmp_path, layout):
    """ComfyUI's scaled fp8: each Linear weight is the stored fp8 times its scale_weight; the marker, the scales
    and scale_input never reach the model."""
    path, model = tiny_qwen_checkpoint(tmp_path, seed=5, layout=layout, scaled_fp8=True)
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    raw = load_file(path)
    assert raw[prefix + "scaled_fp8"].dtype == FP8
    linear = _linear_weights(model)
    for k in linear:  # ComfyUI's files also carry a scale_input per Linear (for fp8 matmuls)
        raw[prefix + k[:-len("weight")] + "scale_input"] = torch.ones(())
    save_file(raw, path)
    info = read_qwen_info(path)
    assert info.scaled_fp8 and info.config == CONFIG and info.stored_dtypes == {"float8_e4m3fn", "float32"}
    loaded, _ = load_qwen_transformer(path, dtype=torch.float32)
    got, orig = loaded.state_dict(), model.state_dict()
    assert set(got) == set(orig)  # no scaled_fp8 / scale_weight / scale_input key leaks in
    for k, w in orig.items():
        if k in linear:
            q, s = raw[prefix + k], raw[prefix + k[:-len("weight")] + "scale_weight"]
            assert q.dtype == FP8 and s.numel() == 1
            assert torch.equal(got[k], q.float() * s.float()), k
            bound = w.abs() * 2 ** -4 + s.float() * 2 ** -10  # e4m3: half an ulp of 3 mantissa bits (subnormals)
        elif k[:-len("bias")] + "weight" in linear:  # Linear biases: plain fp8, no scale
            bound = w.abs() * 2 ** -4 + 2 ** -10
        else:  # norms: as written (fp32)
            bound = torch.zeros_like(w)
        assert ((got[k] - w).abs() <= bound * 1.0001).all(), k
    fp8, _ = load_qwen_transformer(path, dtype=torch.float32, fp8=True)  # fp8 storage of the dequantised weights
    w = fp8.transformer_blocks[0].attn.to_q.weight
    assert w.dtype == FP8 and torch.equal(w.view(torch.uint8), got["transformer_blocks.0.attn.to_q.weight"]
                                          .to(FP8).view(torch.uint8))


def test_fp8_keeps_the_blocks_linear_weights_in_fp8(tmp_path):
    path, model = tiny_qwen_checkpoint(tmp_path, seed=6)
    loaded, _ = load_qwen_transformer(path, dtype=torch.bfloat16, fp8=True)
    got, orig = loaded.state_dict(), model.state_dict()
    assert set(got) == set(orig)
    in_blocks = {k for k in _linear_weights(model) if k.startswith("transformer_blocks.")}
    assert len(in_blocks) == CONFIG["num_layers"] * len(LINEAR)
    for k, v in got.items():
        if k in in_blocks:
            assert v.dtype == FP8 and torch.equal(v.view(torch.uint8), orig[k].to(FP8).view(torch.uint8)), k
        else:  # embedders, head, norms and biases: the compute dtype
            assert v.dtype == torch.bfloat16 and torch.equal(v, orig[k].to(torch.bfloat16)), k


def _stage_keys(keys, start, stop, n) -> set:
    """A stage's keys, written out independently of BlockLayout."""
    out = set()
    for k in keys:
        if k.startswith("transformer_blocks."):
            keep = start <= int(k.split(".")[1]) < stop
        elif k.startswith(("img_in.", "txt_norm.", "txt_in.")):
            keep = start == 0
        elif k.startswith(("norm_out.", "proj_out.")):
            keep = stop == n
        else:
            keep = k.startswith("time_text_embed.")  # every block is modulated by it
        if keep:
            out.add(k)
    return out


@pytest.mark.parametrize("stage", [(0, 1), (1, 2)])
def test_stage_loads_and_reads_only_its_tensors(tmp_path, stage):
    start, stop = stage
    path, model = tiny_qwen_checkpoint(tmp_path, seed=7, layout="comfy")
    others = {"vae.decoder.conv_in.weight": torch.zeros(8, 16),
              "text_encoders.qwen25_7b.lm_head.weight": torch.zeros(8)}
    save_file({**load_file(path), **others}, path)  # a ComfyUI full checkpoint: the VAE and text encoder beside
    orig = model.state_dict()
    want = _stage_keys(orig, start, stop, CONFIG["num_layers"])
    with recording_reads() as read:
        part, _ = load_qwen_transformer(path, dtype=torch.float32, stage=stage)
    assert set(read) == {COMFY_PREFIX + k for k in want}  # never the VAE's or the text encoder's
    _same(part.state_dict(), {k: orig[k] for k in want})
    blocks = part.transformer_blocks
    assert isinstance(blocks[1 - start], torch.nn.Identity) and not isinstance(blocks[start], torch.nn.Identity)
    assert part.time_text_embed is not None
    assert all((getattr(part, n) is not None) == (start == 0) for n in ("img_in", "txt_norm", "txt_in"))
    assert all((getattr(part, n) is not None) == (stop == 2) for n in ("norm_out", "proj_out"))


def test_full_size_config_from_shapes():
    config = QWEN.preset_config("qwen-image")
    shapes = dict(QWEN.meta_model(config).state_dict())
    got = qwen_config_from_shapes(shapes)
    assert got == config and QWEN.variant(got) == "qwen-image"
    assert (got["num_layers"], got["num_attention_heads"], got["joint_attention_dim"]) == (60, 24, 3584)
    assert QWEN.width(got) == 3072 and QWEN.num_heads(got) == 24
    assert 20.3e9 < sum(v.numel() for v in shapes.values()) < 20.5e9  # Qwen-Image's 20.4B


def _raises(path, match, *calls):
    for call in calls:
        with pytest.raises(CheckpointError, match=match) as e:
            call(path)
        assert str(e.value).startswith(os.fspath(path)), str(e.value)


def test_truncated_and_empty_files(tmp_path):
    path, _ = tiny_qwen_checkpoint(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    _raises(path, "truncated", detect_family, QWEN.read_info, QWEN.load)
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    _raises(empty, "contains no tensors", QWEN.read_info, QWEN.load)


@pytest.mark.parametrize("other", ["flux", "wan"])
def test_other_families_files_are_not_qwen(tmp_path, other):
    if other == "flux":  # diffusers' Flux names share transformer_blocks.N.attn.to_q, norm_out, proj_out
        from tests.flux_tiny import make_tiny_flux, write_flux_checkpoint

        path = write_flux_checkpoint(make_tiny_flux(), tmp_path / "flux.safetensors", layout="diffusers")
    else:
        from tests.wan_tiny import tiny_wan_checkpoint

        path, _ = tiny_wan_checkpoint(tmp_path, layout="diffusers")
    header_keys = list(load_file(path))
    assert detect_qwen_layout(header_keys) is None
    assert detect_family(path)[0].name == other
    _raises(path, "does not look like a Qwen-Image transformer", QWEN.read_info, QWEN.load)


def test_broken_qwen_files(tmp_path):
    path, model = tiny_qwen_checkpoint(tmp_path)
    sd = load_file(path)

    def variant(name, out):
        p = tmp_path / f"{name}.safetensors"
        save_file(out, p)
        return p

    no_block0 = variant("no_block0", {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.0.")})
    _raises(no_block0, "transformer_blocks.0", QWEN.read_info, QWEN.load)
    (tmp_path / "three").mkdir()  # a gap: block 1 of 3 gone (the block count is the largest index + 1)
    three, _ = tiny_qwen_checkpoint(tmp_path / "three", num_layers=3)
    gap = variant("gap", {k: v for k, v in load_file(three).items() if not k.startswith("transformer_blocks.1.")})
    _raises(gap, r"keys missing for a Qwen-Image transformer with 3 blocks.*transformer_blocks\.1\.", QWEN.load)
    one_missing = variant("one_missing", {k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.to_k.weight"})
    _raises(one_missing, r"1 keys missing.*transformer_blocks\.1\.attn\.to_k\.weight", QWEN.load)
    extra = variant("extra", {**sd, "transformer_blocks.0.attn.lora_down.weight": torch.zeros(2, 2)})
    _raises(extra, "unexpected", QWEN.load)
    shape = variant("shape", {**sd, "transformer_blocks.1.img_mlp.net.2.weight": torch.zeros(512, 1024)})
    _raises(shape, "shapes do not fit", QWEN.load)
    layered = variant("layered", {**sd, "time_text_embed.addition_t_embedding.weight": torch.zeros(2, 512)})
    assert detect_family(layered)[0] is QWEN  # a Qwen-Image file, of a kind not run yet
    _raises(layered, "Qwen-Image-Layered", QWEN.read_info, QWEN.load, lambda p: read_info(p))
    (tmp_path / "head64").mkdir()
    head64 = tiny_qwen_checkpoint(tmp_path / "head64", num_attention_heads=8, attention_head_dim=64,
                                  axes_dims_rope=(8, 28, 28))[0]
    _raises(head64, "head size 64", QWEN.read_info)


# --- the family's shapes and conditioning ------------------------------------------------------------------


def test_check_latent():
    for shape in [(1, 16, 1, 8, 12), (1, 16, 8, 12), (2, 16, 1, 128, 96)]:
        QWEN.check_latent(CONFIG, shape)
    with pytest.raises(ValueError, match="makes images: got a latent of 2 frames"):
        QWEN.check_latent(CONFIG, (1, 16, 2, 8, 8))
    with pytest.raises(ValueError, match="16 channels, got 4"):
        QWEN.check_latent(CONFIG, (1, 4, 8, 8))
    with pytest.raises(ValueError, match="16 channels, got 48"):
        QWEN.check_latent(CONFIG, (1, 48, 1, 8, 8))
    for shape in [(1, 16, 1, 7, 8), (1, 16, 7, 8)]:
        with pytest.raises(ValueError) as e:
            QWEN.check_latent(CONFIG, shape)
        assert str(e.value).startswith("a 64x56 px image (width x height; latent 8x7) does not split into 2x2")
        assert "multiples of 16 px" in str(e.value)


def test_reference_latents_to_model_space_in_numeric_order():
    """ref_latents.0 .. ref_latents.10 (VAE space, [1, 16, 1, h, w]) -> one model-space list, 10 after 9 (not
    after 1 as strings sort); the 'offset' marker becomes the method."""
    g = torch.Generator().manual_seed(0)
    cond = qwen_cond(CONFIG, 1, 5, g)
    sizes = {i: (2 * (i % 3 + 1), 4 + 2 * (i % 2)) for i in range(11)}
    for i in [10, 2, 0, 1, 9, 3, 4, 5, 6, 7, 8]:  # not in order, and "10" < "2" as strings
        cond[f"ref_latents.{i}"] = torch.full((1, 16, 1, *sizes[i]), float(i)) + torch.randn(1, 16, 1, *sizes[i],
                                                                                               generator=g)
    given = {k: v.clone() for k, v in cond.items()}
    out = QWEN.prepare_conditioning(CONFIG, cond, (1, 16, 1, 8, 8))
    assert not [k for k in out if k.startswith("ref_latents.")] and out["ref_method"] == "index"
    assert torch.equal(out["context"], given["context"])
    refs = out["ref_latents"]
    assert len(refs) == 11
    fmt = QWEN.latent_format
    for i, r in enumerate(refs):
        assert r.shape == (1, 16, *sizes[i]) and r.dtype == torch.float32
        assert torch.allclose(r, fmt.to_model(given[f"ref_latents.{i}"][:, :, 0]), atol=1e-6), i

    offset = {"context": given["context"], "ref_latents.0": torch.zeros(1, 16, 4, 6),
              "ref_latents_offset": torch.ones(1)}
    out = QWEN.prepare_conditioning(CONFIG, offset, (1, 16, 1, 8, 8))  # a 4-D reference is taken too
    assert out["ref_method"] == "offset" and "ref_latents_offset" not in out
    assert out["ref_latents"][0].shape == (1, 16, 4, 6)
    plain = QWEN.prepare_conditioning(CONFIG, {"context": given["context"]}, (1, 16, 1, 8, 8))
    assert set(plain) == {"context"}


@pytest.mark.parametrize("shape", [(1, 16, 2, 4, 4), (1, 8, 1, 4, 4), (1, 16, 4)])
def test_bad_reference_latents(shape):
    cond = {"context": torch.zeros(1, 3, 64), "ref_latents.0": torch.zeros(shape)}
    with pytest.raises(ValueError, match=r"a reference latent must be one 16-channel image latent; got shape"):
        QWEN.prepare_conditioning(CONFIG, cond, (1, 16, 1, 8, 8))
