"""Single-file VAE loading (LDM/ComfyUI and diffusers layouts), config inference, ComfyUI decode/encode, bad files."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from comfy_xdit.vae import (
    CheckpointError, decode, detect_vae_layout, encode, load_vae, vae_config_from_state_dict, vae_to_ldm,
    write_vae_checkpoint)
from tests.flux_tiny import make_tiny_flux, write_flux_checkpoint


def _tiny_vae(latent=16, quant=False, seed=0):
    torch.manual_seed(seed)
    # four levels like real VAEs, so latents are 1/8 of the image size
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=latent,
                        norm_num_groups=32, use_quant_conv=quant, use_post_quant_conv=quant)
    with torch.no_grad():  # perturb every tensor (norms start at 1/0) so any misplaced weight changes outputs
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


@pytest.fixture(scope="module")
def flux_vae():
    return _tiny_vae(16, quant=False)


@pytest.fixture(scope="module")
def sd_vae():
    return _tiny_vae(4, quant=True, seed=1)


def _assert_same_weights(got, want):
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and not got[k].is_meta, k
        assert torch.equal(got[k], want[k]), k


def _image(b=2, h=24, w=40, c=3, seed=3):
    return torch.rand(b, h, w, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["flux_vae", "sd_vae"])
@pytest.mark.parametrize("layout", ["ldm", "comfy", "diffusers"])
def test_load_matches_original(tmp_path, request, fixture, layout):
    ref = request.getfixturevalue(fixture)
    vae, info = load_vae(write_vae_checkpoint(ref, tmp_path / "vae.safetensors", layout=layout))
    _assert_same_weights(vae, ref)
    assert info.layout == ("diffusers" if layout == "diffusers" else "ldm") and info.stored_dtypes == {"float32"}
    z = torch.randn(2, ref.config.latent_channels, 3, 5, generator=torch.Generator().manual_seed(0))
    img = decode(vae, z)
    assert torch.equal(img, decode(ref, z))
    with torch.no_grad():  # ComfyUI VAE.decode: raw latent in, clamp((x + 1) / 2) out, channels last
        want = ((ref.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(img, want, rtol=0, atol=0)
    assert img.shape == (2, 24, 40, 3) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert img.std() > 0.05  # not a saturated or constant image
    x = _image()
    lat = encode(vae, x)
    assert torch.equal(lat, encode(ref, x)) and lat.shape == (2, ref.config.latent_channels, 3, 5)
    with torch.no_grad():  # ComfyUI VAE.encode: image * 2 - 1 in, posterior mode (= mean) out, no scale/shift
        torch.testing.assert_close(lat, ref.encode(x.movedim(-1, 1) * 2 - 1).latent_dist.mean, rtol=0, atol=0)


def test_ldm_keys_match_diffusers_converter(tmp_path, flux_vae, sd_vae):
    """diffusers' own LDM converter reads our LDM files back to the original weights (an independent mapping)."""
    for ref in (flux_vae, sd_vae):
        sd = load_file(write_vae_checkpoint(ref, tmp_path / "vae.safetensors", layout="ldm"))
        assert "encoder.down.2.block.0.nin_shortcut.weight" in sd and "decoder.up.3.upsample.conv.weight" in sd
        assert sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1) and "decoder.norm_out.weight" in sd
        assert ("quant_conv.weight" in sd) == ref.config.use_quant_conv
        conv = convert_ldm_vae_checkpoint(sd, dict(ref.config))
        want = ref.state_dict()
        assert conv.keys() == want.keys()
        assert all(torch.equal(conv[k].reshape(want[k].shape), want[k]) for k in want)


def test_config_and_latent_format(tmp_path, flux_vae, sd_vae):
    _, info = load_vae(write_vae_checkpoint(flux_vae, tmp_path / "f.safetensors"))
    c = info.config
    assert (c["block_out_channels"], c["layers_per_block"], c["latent_channels"]) == ((32, 32, 64, 64), 1, 16)
    assert not c["use_quant_conv"] and not c["use_post_quant_conv"] and c["mid_block_add_attention"]
    assert (info.latent_format, info.scale_factor, info.shift_factor) == ("flux", 0.3611, 0.1159)
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(info.process_in(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(info.process_out(info.process_in(z)), z)
    _, info = load_vae(write_vae_checkpoint(sd_vae, tmp_path / "s.safetensors"))
    assert info.latent_channels == 4 and info.config["use_quant_conv"] and info.config["use_post_quant_conv"]
    assert (info.latent_format, info.scale_factor, info.shift_factor) == ("sd15", 0.18215, 0.0)
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in vae_to_ldm(flux_vae.state_dict()).items()}
    assert vae_config_from_state_dict(shapes) == c
    assert detect_vae_layout(shapes) == "ldm" and detect_vae_layout(flux_vae.state_dict()) == "diffusers"


def test_storage_dtype_and_target_dtype(tmp_path, flux_vae):
    path = write_vae_checkpoint(flux_vae, tmp_path / "vae.safetensors", dtype=torch.bfloat16)
    vae, info = load_vae(path, dtype=torch.float16)
    assert info.stored_dtypes == {"bfloat16"} and all(p.dtype == torch.float16 for p in vae.parameters())
    img = decode(vae, torch.randn(1, 16, 2, 3))
    assert img.dtype == torch.float32 and img.shape == (1, 16, 24, 3)
    assert encode(vae, _image(1, 16, 16)).dtype == torch.float32


@pytest.mark.parametrize("h,w", [(16, 40), (40, 16), (8, 8), (56, 24)])
def test_round_trip_shapes(flux_vae, h, w):
    lat = encode(flux_vae, _image(3, h, w))
    assert lat.shape == (3, 16, h // 8, w // 8)
    img = decode(flux_vae, lat)
    assert img.shape == (3, h, w, 3) and img.dtype == torch.float32


def test_encode_crops_and_drops_alpha_like_comfyui(flux_vae):
    x = _image(2, 29, 43, 4)  # 29 -> 24 from offset 2, 43 -> 40 from offset 1; alpha ignored
    torch.testing.assert_close(encode(flux_vae, x), encode(flux_vae, x[:, 2:26, 1:41, :3]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="IMAGE"):
        encode(flux_vae, _image(1, 4, 16))
    with pytest.raises(ValueError, match="16 latent channels"):
        decode(flux_vae, torch.randn(1, 4, 2, 2))


def test_all_in_one_and_old_attention_names(tmp_path, flux_vae):
    ldm = vae_to_ldm(flux_vae.state_dict())
    for prefix in ("first_stage_model.", "vae."):
        sd = {prefix + k: v.contiguous() for k, v in ldm.items()}
        sd["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"] = torch.zeros(3, 3)
        sd["cond_stage_model.transformer.x.weight"] = torch.zeros(2)
        save_file(sd, tmp_path / "all.safetensors")
        _assert_same_weights(load_vae(tmp_path / "all.safetensors")[0], flux_vae)
    old = {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in flux_vae.state_dict().items():
        for new, o in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        sd[k] = v.contiguous()
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    save_file(sd, tmp_path / "old.safetensors")
    _assert_same_weights(load_vae(tmp_path / "old.safetensors")[0], flux_vae)


def _raises(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_vae(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "Flux.1 transformer checkpoint" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_bad_files(tmp_path, flux_vae):
    good = write_vae_checkpoint(flux_vae, tmp_path / "vae.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _raises(tmp_path / "trunc.safetensors", "truncated", "VAE checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:200])
    _raises(tmp_path / "junk.safetensors", "corrupt")
    (tmp_path / "text.safetensors").write_text("hello")
    _raises(tmp_path / "text.safetensors", "not a readable safetensors file")
    _raises(tmp_path / "missing.safetensors", "cannot open")
    flux = write_flux_checkpoint(make_tiny_flux(), tmp_path / "flux.safetensors", layout="comfy")
    _raises(flux, "does not look like a KL VAE", "Flux.1 transformer")
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, tmp_path / "t5.safetensors")
    _raises(tmp_path / "t5.safetensors", "text encoder")
    save_file({}, tmp_path / "empty.safetensors")
    _raises(tmp_path / "empty.safetensors", "no tensors")
    sd = load_file(good)
    save_file({k: v for k, v in sd.items() if "decoder.up.3.block.1." not in k}, tmp_path / "gap.safetensors")
    _raises(tmp_path / "gap.safetensors", "keys missing", "decoder.up.3.block.1.conv1.weight")
    save_file({**sd, "encoder.down.0.attn.0.q.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    _raises(tmp_path / "extra.safetensors", "unexpected keys", "encoder.down.0.attn.0.q.weight")
    save_file({**sd, "decoder.conv_out.bias": torch.zeros(5)}, tmp_path / "shape.safetensors")
    _raises(tmp_path / "shape.safetensors", "do not fit", "decoder.conv_out.bias")
    save_file({**sd, "encoder.conv_out.weight": torch.zeros(16, 64, 3, 3), "encoder.conv_out.bias": torch.zeros(16)},
              tmp_path / "ae.safetensors")
    _raises(tmp_path / "ae.safetensors", "not a KL VAE")
