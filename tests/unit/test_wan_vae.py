"""Wan 2.1 / 2.2 video VAEs: single files in the original Wan and diffusers layouts load to the written weights,
the config comes from shapes, bad files fail clearly before any tensor is read, and decode / encode follow
ComfyUI's video semantics (frames as the IMAGE batch, 1 + 4 (T - 1) frames, chunks of 1, 4, 4..., center crop)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file

from comfy_xdit.vae import (CheckpointError, decode, encode, latent_rows, load_vae, wan, wan_latent_stats,
                            wan_vae_config_from_state_dict, wan_vae_to_original, write_vae_checkpoint,
                            write_wan_vae_checkpoint)

TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY22 = dict(TINY, base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
              patch_size=2, scale_factor_spatial=16)
# the released VAEs' diffusers configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan2.2-TI2V-5B-Diffusers vae/config.json)
FULL21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
FULL22 = dict(FULL21, base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
              patch_size=2, scale_factor_spatial=16)


def _tiny(cfg, seed=0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**cfg)
    with torch.no_grad():  # perturb every tensor (RMS norms start at 1) so any misplaced weight changes outputs
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


@pytest.fixture(scope="module")
def vae21():
    return _tiny(TINY)


@pytest.fixture(scope="module")
def vae22():
    return _tiny(TINY22, seed=1)


def _meta(cfg) -> AutoencoderKLWan:
    with torch.device("meta"):
        return AutoencoderKLWan(**cfg)


def _same_weights(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == torch.float32 and not a[k].is_meta and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fixture", ["vae21", "vae22"])
@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_round_trip(tmp_path, request, fixture, layout):
    ref = request.getfixturevalue(fixture)
    path = write_wan_vae_checkpoint(ref, tmp_path / "vae.safetensors", layout=layout)
    keys = set(load_file(path))
    if layout == "wan":
        assert {"encoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight",
                "decoder.middle.1.to_qkv.weight"} <= keys and not any("_blocks" in k for k in keys)
    else:
        assert keys == set(ref.state_dict())
    vae, info = load_vae(path)
    assert isinstance(vae, AutoencoderKLWan) and not vae.training
    _same_weights(vae, ref)
    v22 = fixture == "vae22"
    assert (info.layout, info.latent_channels, info.latent_format) == (layout, 48 if v22 else 16,
                                                                       "wan22" if v22 else "wan21")
    assert (info.is_video, info.temporal_ratio, info.spatial_ratio) == (True, 4, 16 if v22 else 8)
    assert info.stored_dtypes == {"float32"}
    for k, v in (TINY22 if v22 else TINY).items():
        assert info.config[k] == v, k


def test_bf16_file_casts_on_read(tmp_path, vae21):
    path = write_wan_vae_checkpoint(vae21, tmp_path / "vae.safetensors", dtype=torch.bfloat16)
    vae, info = load_vae(path)
    assert info.stored_dtypes == {"bfloat16"}
    want = vae21.state_dict()
    assert all(torch.equal(v, want[k].bfloat16().float()) for k, v in vae.state_dict().items())
    vae, _ = load_vae(path, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("fixture", ["vae21", "vae22"])
def test_original_keys_are_a_bijection_and_prefixes_load(tmp_path, request, fixture):
    ref = request.getfixturevalue(fixture)
    sd = ref.state_dict()
    original = wan_vae_to_original(sd)
    assert len(original) == len(sd)
    path = tmp_path / "all_in_one.safetensors"  # the VAE under vae. beside other components
    save_file({**{"vae." + k: v.contiguous() for k, v in original.items()}, "text.weight": torch.zeros(2)}, path)
    vae, info = load_vae(path)
    _same_weights(vae, ref)
    assert info.layout == "wan"


def test_names_match_diffusers_converter_on_the_released_21_vae():
    """On the full-size Wan 2.1 VAE (whose layout diffusers' converter hard-codes) both mappings agree."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = _meta(FULL21)
    original = wan_vae_to_original(model.state_dict())
    for k in ("encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
              "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.4.shortcut.weight",
              "decoder.upsamples.7.time_conv.weight", "decoder.upsamples.14.residual.6.bias", "conv1.weight"):
        assert k in original, k
    assert convert_wan_vae_to_diffusers(dict(original)).keys() == model.state_dict().keys()
    # and why it is not used: on Wan 2.2's nested blocks its names are not the model's
    model22 = _meta(FULL22)
    assert convert_wan_vae_to_diffusers(wan_vae_to_original(model22.state_dict())).keys() != \
        model22.state_dict().keys()


@pytest.mark.parametrize("cfg", [FULL21, FULL22, TINY, TINY22,
                                 dict(TINY, dim_mult=[1, 2, 3], temperal_downsample=[True, False], num_res_blocks=2)])
def test_config_from_shapes(cfg):
    model = _meta(cfg)
    config = wan_vae_config_from_state_dict(wan_vae_to_original(model.state_dict()))
    for k, v in cfg.items():
        assert config[k] == v, k
    assert config["attn_scales"] == [] and config.get("is_residual", False) == cfg.get("is_residual", False)
    assert config["decoder_base_dim"] == cfg.get("decoder_base_dim")  # None: the encoder's width
    assert config["scale_factor_temporal"] == 2 ** sum(cfg["temperal_downsample"])
    rebuilt = _meta(config).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_latent_stats_are_comfyuis():
    """ComfyUI's latent_formats.Wan21 / Wan22 (first and last entries quoted from comfy/latent_formats.py)."""
    mean, std = wan_latent_stats(16)
    assert mean.shape == std.shape == (16,)
    assert (mean[0].item(), mean[-1].item(), std[0].item(), std[-1].item()) == pytest.approx(
        (-0.7571, -0.2921, 2.8184, 1.9160))
    mean, std = wan_latent_stats(48)
    assert mean.shape == std.shape == (48,)
    assert (mean[0].item(), mean[-1].item(), std[0].item(), std[-1].item()) == pytest.approx(
        (-0.2289, -0.0667, 0.4765, 0.7744))
    mean, std = wan_latent_stats(4)
    assert torch.equal(mean, torch.zeros(4)) and torch.equal(std, torch.ones(4))


def test_process_in_out_per_channel(tmp_path, vae22):
    _, info = load_vae(write_wan_vae_checkpoint(vae22, tmp_path / "v.safetensors"))
    mean, std = wan_latent_stats(48)
    x = torch.randn(2, 48, 3, 4, 5)
    want = (x - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)  # ComfyUI's Wan22.process_in (scale 1)
    torch.testing.assert_close(info.process_in(x), want)
    torch.testing.assert_close(info.process_out(info.process_in(x)), x)
    assert info.process_in(x.double()).dtype == torch.float64


def _bad(tmp_path, vae, edit, layout="wan"):
    sd = load_file(write_wan_vae_checkpoint(vae, tmp_path / "good.safetensors", layout=layout))
    edit(sd)
    save_file(sd, tmp_path / "bad.safetensors")
    return tmp_path / "bad.safetensors"


def test_bad_files_fail_before_any_read(tmp_path, vae21, vae22, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tensors read before the file was validated")

    monkeypatch.setattr(wan, "read_tensors", boom)
    cases = [
        (vae21, "wan", lambda sd: sd.pop("decoder.upsamples.2.resample.1.weight"),
         r"1 keys missing for a Wan 2.1 VAE with base width 16, levels \[1, 2, 2, 2\] and 1 residual blocks, "
         r"e.g. \['decoder.upsamples.2.resample.1.weight'\]"),
        (vae22, "wan", lambda sd: sd.update({"decoder.upsamples.0.upsamples.9.residual.0.gamma": torch.ones(1)}),
         r"1 unexpected keys for a Wan 2.2 VAE .*\['decoder.upsamples.0.upsamples.9.residual.0.gamma'\]"),
        (vae22, "diffusers", lambda sd: sd.pop("decoder.up_blocks.1.upsampler.time_conv.bias"),
         r"1 keys missing .* e.g. \['decoder.up_blocks.1.upsampler.time_conv.bias'\]"),  # named as in the file
        (vae21, "diffusers", lambda sd: sd.update({"decoder.up_blocks.0.extra.weight": torch.ones(1),
                                                   "decoder.mid_block.resnets.2.norm1.gamma": torch.ones(1)}),
         r"2 unexpected keys .*\['decoder.mid_block.resnets.2.norm1.gamma', 'decoder.up_blocks.0.extra.weight'\]"),
        (vae21, "wan", lambda sd: sd.update({"decoder.middle.1.proj.weight": torch.ones(64, 64, 1, 1)}),
         r"tensor shapes do not fit .*'decoder.middle.1.proj.weight: \(64, 64, 1, 1\) != \(32, 32, 1, 1\)"),
        (vae21, "wan", lambda sd: sd.pop("conv2.weight"), r"missing keys needed to infer the Wan VAE size: "
                                                          r"\['conv2.weight'\]"),
        (vae21, "wan", lambda sd: sd.update({"encoder.head.2.weight": torch.ones(30, 32, 3, 3, 3)}),
         r"encoder outputs 30 channels, expected 2 x 16 latent channels; not a Wan VAE"),
    ]
    for vae, layout, edit, message in cases:
        path = _bad(tmp_path, vae, edit, layout)
        with pytest.raises(CheckpointError, match=r"^" + str(path).replace(".", r"\.") + ": " + message):
            load_vae(path)


def test_truncated_and_foreign_files(tmp_path, vae21):
    path = write_wan_vae_checkpoint(vae21, tmp_path / "vae.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="file is truncated"):
        load_vae(path)
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "other.safetensors")  # neither kind
    with pytest.raises(CheckpointError, match="does not look like a KL VAE"):
        load_vae(tmp_path / "other.safetensors")


def test_kl_vaes_still_load(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32).eval()
    vae, info = load_vae(write_vae_checkpoint(ref, tmp_path / "kl.safetensors"))
    assert isinstance(vae, AutoencoderKL) and not info.is_video and info.spatial_ratio == 2
    assert info.latents_mean is None and info.temporal_ratio == 1


def _reference_decode(vae, z):
    """ComfyUI: VAE.decode clamps (x + 1) / 2, moves channels last; VAEDecode folds [B, F] into the batch."""
    with torch.no_grad():
        x = ((vae.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    return x.reshape(-1, *x.shape[-3:])


@pytest.mark.parametrize("fixture", ["vae21", "vae22"])
def test_decode_frames_and_shapes(request, fixture):
    vae = request.getfixturevalue(fixture)
    r, c = wan.spatial_ratio(vae), vae.config.z_dim
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 1), (2, 2), (1, 3)):
        z = torch.randn(b, c, t, 3, 2, generator=g)
        img = decode(vae, z)  # loader.decode hands Wan VAEs to wan.decode
        f = 1 + 4 * (t - 1)
        assert f == wan.decoded_frames(t) and img.shape == (b * f, 3 * r, 2 * r, 3) and img.dtype == torch.float32
        assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.02
        torch.testing.assert_close(img, _reference_decode(vae, z), rtol=0, atol=0)
        if b == 2:  # frames of the first video, then the second's
            torch.testing.assert_close(img[f:], decode(vae, z[1:]), rtol=0, atol=1e-5)
    assert latent_rows((1, c, 3, 7, 2)) == 7 and latent_rows((1, 4, 7, 2)) == 7
    with pytest.raises(ValueError, match=r"expected \[B, 16, T, h, w\]"):
        decode(request.getfixturevalue("vae21"), torch.zeros(1, 16, 4, 4))


@pytest.mark.parametrize("fixture", ["vae21", "vae22"])
def test_encode_frames_crop_and_alpha(request, fixture):
    vae = request.getfixturevalue(fixture)
    r, c = wan.spatial_ratio(vae), vae.config.z_dim
    g = torch.Generator().manual_seed(1)
    video = torch.rand(9, 2 * r + 3, 3 * r + 2, 4, generator=g)  # crop to 2r x 3r, from row 1 and column 1
    cropped = video[:, 1:1 + 2 * r, 1:1 + 3 * r, :3]
    with torch.no_grad():  # ComfyUI: [F, H, W, C] -> [1, C, F, H, W], * 2 - 1, the posterior mean
        want = vae.encode(cropped.movedim(-1, 0).unsqueeze(0) * 2 - 1).latent_dist.mean
    lat = encode(vae, video)
    assert lat.shape == (1, c, 3, 2, 3) and lat.dtype == torch.float32
    torch.testing.assert_close(lat, want, rtol=0, atol=0)
    for frames in (1, 2, 4, 5, 6, 8):
        t = 1 + (frames - 1) // 4
        assert wan.encoded_frames(frames) == t
        got = encode(vae, video[:frames])
        assert got.shape == (1, c, t, 2, 3), frames
        # frames past the last whole chunk of 4 are never read: the same as encoding without them
        torch.testing.assert_close(got, encode(vae, video[:1 + 4 * (t - 1)]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="is not an IMAGE"):
        encode(vae, torch.rand(2, r - 1, 2 * r, 3))
