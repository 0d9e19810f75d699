"""Flux ControlNets in one process: file layouts, parity with diffusers, strength, percent range, bad files."""

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.imageops import fit_image
from comfy_xdit.models.checkpoint import CheckpointError
from comfy_xdit.models.flux import FluxModel, flux_conditioning, image_ids, pack_latents, unpack_latents
from comfy_xdit.models.flux.controlnet import (ControlledFluxModel, FluxControl, load_flux_controlnet,
                                               random_flux_controlnet, write_flux_controlnet)
from tests.flux_tiny import make_tiny_flux, tiny_flux_config, write_flux_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated")  # raised inside diffusers' ControlNet
H, W, TEXT = 8, 12, 7
# name -> (random_flux_controlnet kwargs, file layout, transformer double blocks)
KINDS = {
    "instantx": (dict(num_layers=1, num_single_layers=1), "diffusers", 2),
    "union": (dict(num_layers=2, num_single_layers=0, num_mode=3), "diffusers", 2),
    # 2 XLabs blocks over 3 transformer blocks: cyclic (0, 1, 0) differs from contiguous (0, 0, 1)
    "xlabs": (dict(num_layers=2, num_single_layers=0, xlabs=True), "xlabs", 3),
}
XLABS_KEYS = {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias",
              "guidance_in.in_layer.weight", "double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_mod.lin.bias",
              "double_blocks.0.img_attn.norm.query_norm.scale", "controlnet_blocks.1.weight", "pos_embed_input.weight",
              "input_hint_block.0.weight", "input_hint_block.14.bias"}


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    out, d = {}, tmp_path_factory.mktemp("cn")
    for i, (kind, (kw, layout, layers)) in enumerate(KINDS.items()):
        original = random_flux_controlnet(tiny_flux_config(), seed=10 + i, **kw)
        path = write_flux_controlnet(original, d / f"{kind}.safetensors", layout=layout)
        out[kind] = (original, path, make_tiny_flux(seed=i, num_layers=layers))
    return out


def _inputs(kind, seed=0, sigma=0.6):
    g = torch.Generator().manual_seed(seed)
    hint = torch.rand(1, H * 8, W * 8, 3, generator=g) if kind == "xlabs" else torch.randn(1, 16, H, W, generator=g)
    return dict(x=torch.randn(1, 16, H, W, generator=g), context=torch.randn(1, TEXT, 64, generator=g),
                pooled=torch.randn(1, 32, generator=g), hint=hint, sigma=sigma)


def _denoise(model, inp):
    cond = flux_conditioning(inp["context"], inp["pooled"], 3.5)
    return model.denoiser(cond, tuple(inp["x"].shape))(inp["x"], inp["sigma"])


def _controlled(flux, cn, info, inp, **kw):
    mode = 1 if info.num_mode else None
    return _denoise(ControlledFluxModel(FluxModel(flux), [FluxControl(cn, info, inp["hint"], mode=mode, **kw)]), inp)


@torch.no_grad()
def _diffusers_reference(flux, cn, inp, strength, mode, repeat):
    """diffusers' own FluxControlNetPipeline step: ControlNet forward, then the transformer with its residuals."""
    x, sigma = inp["x"], inp["sigma"]
    packed, t, g = pack_latents(x), torch.tensor([sigma]), torch.tensor([3.5])
    cond = inp["hint"].movedim(-1, 1) * 2 - 1 if inp["hint"].shape[-1] == 3 else pack_latents(inp["hint"])
    ids = dict(img_ids=image_ids(H, W), txt_ids=torch.zeros(TEXT, 3))
    common = dict(encoder_hidden_states=inp["context"], pooled_projections=inp["pooled"], timestep=t, guidance=g,
                  return_dict=False, **ids)
    double, single = cn(hidden_states=packed, controlnet_cond=cond, conditioning_scale=strength,
                        controlnet_mode=None if mode is None else torch.tensor([[mode]]), **common)
    v = flux(hidden_states=packed, controlnet_block_samples=double, controlnet_single_block_samples=single,
             controlnet_blocks_repeat=repeat, **common)[0]
    return x - unpack_latents(v, H, W) * sigma


@pytest.mark.parametrize("kind", KINDS)
def test_roundtrip_state_dict(nets, kind):
    original, path, _ = nets[kind]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    got, want = cn.state_dict(), original.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert info.layout == kind and info.blocks_repeat == (kind == "xlabs") and info.stored_dtypes == {"float32"}
    assert info.config == {k: original.config[k] for k in info.config}
    assert (info.hint, info.hint_channels) == (("image", 3) if kind == "xlabs" else ("latent", 16))
    assert info.num_mode == (3 if kind == "union" else None)
    if kind == "xlabs":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            assert XLABS_KEYS <= set(f.keys()) and not any(k.startswith("transformer_blocks") for k in f.keys())


@pytest.mark.parametrize("kind", KINDS)
def test_matches_diffusers(nets, kind):
    original, path, flux = nets[kind]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    inp = _inputs(kind)
    mode = 1 if info.num_mode else None
    got = _controlled(flux, cn, info, inp, strength=0.7)
    want = _diffusers_reference(flux, original, inp, 0.7, mode, info.blocks_repeat)
    plain = _denoise(FluxModel(flux), inp)
    assert (got - want).norm() / want.norm() <= 1e-5
    assert (want - plain).norm() / plain.norm() > 1e-2  # the ControlNet changes the output
    if kind == "xlabs":  # the other block order gives a different result: the cyclic rule is what was checked
        other = _diffusers_reference(flux, original, inp, 0.7, mode, False)
        assert (other - want).norm() / want.norm() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_is_no_controlnet(nets, kind):
    _, path, flux = nets[kind]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    inp = _inputs(kind, seed=1)
    assert torch.equal(_controlled(flux, cn, info, inp, strength=0.0), _denoise(FluxModel(flux), inp))


def test_percent_range(nets):
    _, path, flux = nets["instantx"]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    sampling = FluxModel(flux).model_sampling((1, 16, H, W))
    s30, s60 = sampling.percent_to_sigma(0.3), sampling.percent_to_sigma(0.6)
    assert 0 < s60 < s30 < 1
    for sigma, rng, active in [((s30 + 1) / 2, (0.3, 0.6), False), (s60 / 2, (0.3, 0.6), False),
                               ((s30 + s60) / 2, (0.3, 0.6), True), (0.99, (0.0, 0.6), True), (0.05, (0.3, 1.0), True)]:
        inp = _inputs("instantx", seed=2, sigma=sigma)
        got = _controlled(flux, cn, info, inp, start_percent=rng[0], end_percent=rng[1])
        assert torch.equal(got, _denoise(FluxModel(flux), inp)) != active, (sigma, rng)


def test_union_mode_checks(nets):
    _, path, flux = nets["union"]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    inp = _inputs("union", seed=3)
    with pytest.raises(ValueError, match="control mode 3"):
        ControlledFluxModel(FluxModel(flux), [FluxControl(cn, info, inp["hint"], mode=3)])
    # no mode token (ComfyUI without SetUnionControlNetType) still runs, and differs from a mode
    no_mode = _denoise(ControlledFluxModel(FluxModel(flux), [FluxControl(cn, info, inp["hint"])]), inp)
    assert not torch.allclose(no_mode, _controlled(flux, cn, info, inp))


def test_hint_checks(nets):
    _, path, flux = nets["instantx"]
    cn, info = load_flux_controlnet(path, dtype=torch.float32)
    inp = _inputs("instantx")
    inp["hint"] = inp["hint"][..., :-2]
    with pytest.raises(ValueError, match="does not match"):
        _controlled(flux, cn, info, inp)


def test_fit_image_is_comfy_center_crop():
    img = torch.arange(2 * 3 * 10 * 20, dtype=torch.float32).reshape(2, 3, 10, 20)
    out = fit_image(img, 4, 4)  # aspect 2 -> 1: crop 5 columns each side, then nearest-exact
    torch.testing.assert_close(out, torch.nn.functional.interpolate(img[..., 5:15], size=(4, 4), mode="nearest-exact"))
    assert fit_image(img, 10, 20) is img


def test_bad_files(tmp_path, nets):
    flux_path = write_flux_checkpoint(make_tiny_flux(), tmp_path / "flux.safetensors", layout="bfl")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    sd = load_flux_controlnet(nets["instantx"][1], dtype=torch.float32)[0].state_dict()
    save_file({k: v for k, v in sd.items() if k != "controlnet_blocks.0.bias"}, tmp_path / "cut.safetensors")
    save_file({"controlnet_blocks.0.linear.weight": torch.zeros(2, 2)}, tmp_path / "misto.safetensors")
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    for name, match in [("flux.safetensors", "Flux transformer, not a ControlNet"),
                        ("garbage.safetensors", "not a readable safetensors file.*Flux ControlNet"),
                        ("cut.safetensors", r"missing \['controlnet_blocks.0.bias'\]"),
                        ("misto.safetensors", "MistoLine"), ("unet.safetensors", "SD/SDXL UNet"),
                        ("absent.safetensors", "cannot open")]:
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError, match=match) as e:
            load_flux_controlnet(path)
        assert str(e.value).startswith(path), str(e.value)
