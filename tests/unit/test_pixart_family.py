"""The PixArt family on ComfyUI's terms: the decomposed forward (ComfyUI's positions, our attention processor,
the eps half of the head, unpatchify) against diffusers' own PixArtTransformer2DModel where the two agree on
positions, ComfyUI's position rule itself, the micro-conditions, model sampling, latent formats and checks.
(The forward against ComfyUI's own PixArtMS runs where ComfyUI's Python is; see the family module.)"""

from __future__ import annotations

import math

import pytest
import torch

from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.pixart import PIXART, SD15_LATENT, SDXL_LATENT
from comfy_xdit.models.pixart.family import comfy_positions, pixart_sampling, position_scales
from comfy_xdit.sampling import DiscreteModelSampling, sample
from tests.flux_tiny import rel_err
from tests.pixart_tiny import TINY_PRESETS, make_tiny_pixart, pixart_cond


def _diffusers_forward(model, x, timestep, cond):
    """diffusers' own forward with its own attention processor; its learned-sigma channels dropped."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    added = {"resolution": cond.get("c_size"), "aspect_ratio": cond.get("c_ar")}
    out = model(x, encoder_hidden_states=cond["context"], timestep=timestep, added_cond_kwargs=added,
                return_dict=False)[0]
    return out[:, :x.shape[1]]


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_forward_equals_diffusers(preset, hw):
    """Where diffusers' positions are ComfyUI's (a 64-latent-pixel model at latents whose mean side rounds to 64:
    base 32 tokens, interpolation 1, also non-square), the whole forward equals diffusers' own. diffusers takes
    the timestep, the family sigma: the table index nearest to sigma is the timestep both see."""
    model = make_tiny_pixart(preset, seed=6, sample_size=64, interpolation_scale=None)
    config = dict(model.config)
    dit = DiTModel(PIXART, model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g) * 0.7
    cond = pixart_cond(config, 2, 7, g)
    if config["use_additional_conditions"]:
        cond["c_size"] = torch.tensor([[hw[0] * 8.0, hw[1] * 8.0], [512.0, 768.0]])
        cond["c_ar"] = torch.tensor([[hw[0] / hw[1]], [2 / 3]])
    sigma = torch.tensor([7.5, 0.2])
    timestep = pixart_sampling().timestep(sigma)
    assert timestep.tolist() == [int(torch.argmin((pixart_sampling().sigmas - s).abs())) for s in sigma.tolist()]
    with torch.no_grad():
        got = dit.forward(x, sigma, PIXART.prepare_conditioning(config, dict(cond), tuple(x.shape)))
        want = _diffusers_forward(model, x, timestep.float(), cond)
    assert got.shape == x.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())
    assert want.std() > 0.05


def _comfy_grid(rows, cols, interpolation, base):
    """ComfyUI's PixArt position rule written out per token, in float64: (width-axis, height-axis) positions."""
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append((c / (cols / base) / interpolation, r / (rows / base) / interpolation))
    return torch.tensor(out, dtype=torch.float64)


def test_positions_follow_comfyuis_rule():
    # (latent h, w) -> (interpolation, base tokens): round(mean side / 64), half to even as Python's round
    assert position_scales(128, 128, 2, None) == (2, 64)     # 1024 px
    assert position_scales(256, 256, 2, None) == (4, 128)    # 2048 px
    assert position_scales(96, 96, 2, None) == (2, 64)       # 768 px: 1.5 rounds to 2
    assert position_scales(160, 160, 2, None) == (2, 64)     # 1280 px: 2.5 rounds to 2
    assert position_scales(64, 192, 2, None) == (2, 64)      # mean side 128
    assert position_scales(96, 96, 2, 4) == (4, 64)          # a file's fixed interpolation
    assert position_scales(12, 16, 2, None) == (1, 32)       # under 256 px: 1 (ComfyUI divides by zero)
    width, rows, cols = 16, 3, 5
    got = comfy_positions(width, rows, cols, 2, 64, torch.float32, torch.device("cpu")).double()
    grid = _comfy_grid(rows, cols, 2, 64)
    freq = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    want = []
    for axis in (0, 1):  # the width axis' half first, then the height axis'
        angle = grid[:, axis:axis + 1] * freq[None]
        want += [angle.sin(), angle.cos()]
    assert torch.allclose(got, torch.cat(want, dim=1), atol=1e-5)


def test_positions_and_micro_conditions_matter():
    """The cases above test something: another position rule or other micro-conditions change the output, and
    PixArt-α defaults its micro-conditions to the latent's size in pixels as ComfyUI does."""
    model = make_tiny_pixart("tiny-pixart-alpha", seed=2)
    config = dict(model.config)
    dit = DiTModel(PIXART, model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 40, 48, generator=g)
    cond = pixart_cond(config, 1, 5, g)
    sigma = torch.tensor([1.5])
    latent_size = dict(cond, c_size=torch.tensor([[320.0, 384.0]]), c_ar=torch.tensor([[320 / 384]]))
    other_size = dict(cond, c_size=torch.tensor([[1024.0, 512.0]]), c_ar=torch.tensor([[2.0]]))
    fixed = DiTModel(PIXART, make_tiny_pixart("tiny-pixart-alpha", seed=2, interpolation_scale=2))
    with torch.no_grad():
        plain = dit.forward(x, sigma, cond)
        same = dit.forward(x, sigma, PIXART.prepare_conditioning(config, latent_size, x.shape))
        other = dit.forward(x, sigma, PIXART.prepare_conditioning(config, other_size, x.shape))
        moved = fixed.forward(x, sigma, cond)
    assert torch.equal(plain, same)  # [height, width] = the latent's 320 x 384 px, ratio 320 / 384
    assert rel_err(other, plain) > 1e-3 and rel_err(moved, plain) > 1e-3
    sigma_config = PIXART.preset_config("tiny-pixart-sigma")  # Σ has no micro-conditions: they are dropped
    assert PIXART.prepare_conditioning(sigma_config, pixart_cond(sigma_config, 1, 5, g, size=(64, 64)),
                                       (1, 4, 8, 8)).keys() == {"context"}


def test_prepare_conditioning_shapes():
    config = PIXART.preset_config("tiny-pixart-alpha")
    cond = PIXART.prepare_conditioning(config, {"context": torch.zeros(1, 3, 64), "c_size": torch.ones(2, 2),
                                                "c_ar": torch.ones(2)}, (2, 4, 8, 8))
    assert cond["c_ar"].shape == (2, 1) and cond["c_size"].shape == (2, 2)
    with pytest.raises(ValueError, match=r"c_size micro-condition must be \[N, 2\]"):
        PIXART.prepare_conditioning(config, {"context": torch.zeros(1, 3, 64), "c_size": torch.ones(1, 3)},
                                    (1, 4, 8, 8))


def test_model_sampling_is_comfyuis_discrete_eps():
    config = PIXART.preset_config("tiny-pixart-sigma")
    ms = PIXART.model_sampling(config, (1, 4, 8, 8))
    assert isinstance(ms, DiscreteModelSampling) and ms is pixart_sampling()  # one object per process
    assert (ms.schedule, ms.linear_start, ms.linear_end, ms.prediction) == ("sqrt_linear", 0.0001, 0.02, "eps")
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    alphas = torch.cumprod(1 - betas, 0)
    assert torch.allclose(ms.sigmas.double(), ((1 - alphas) / alphas).sqrt(), rtol=1e-6)
    assert math.isclose(float(ms.sigma_max), 157.4, rel_tol=1e-3) and math.isclose(float(ms.sigma_min), 0.01,
                                                                                  rel_tol=1e-2)
    with pytest.raises(ValueError, match="no shift"):
        PIXART.model_sampling(config, (1, 4, 8, 8), shift=3.0)


def test_latent_formats_and_checks():
    alpha, sigma = PIXART.preset_config("tiny-pixart-alpha"), PIXART.preset_config("tiny-pixart-sigma")
    assert PIXART.latent_format_for(alpha) is SD15_LATENT and SD15_LATENT.scale == 0.18215
    assert PIXART.latent_format_for(sigma) is SDXL_LATENT and SDXL_LATENT.scale == 0.13025
    assert DiTModel(PIXART, make_tiny_pixart("tiny-pixart-alpha")).latent_format is SD15_LATENT
    PIXART.check_latent(alpha, (2, 4, 128, 96))
    with pytest.raises(ValueError, match="4 channels, got 16"):
        PIXART.check_latent(alpha, (1, 16, 8, 8))
    with pytest.raises(ValueError, match="makes images"):
        PIXART.check_latent(alpha, (1, 4, 1, 8, 8))
    with pytest.raises(ValueError) as e:
        PIXART.check_latent(sigma, (1, 4, 7, 8))
    assert str(e.value).startswith("a 64x56 px image (width x height; latent 8x7) does not split into 2x2")
    assert "multiples of 16 px" in str(e.value)


def test_head_keeps_the_eps_channels():
    """PixArt predicts 8 channels (eps and learned sigma); only the eps half leaves the head, in each patch
    pixel's channel order, so the gather moves 16 values per token, not 32."""
    model = make_tiny_pixart("tiny-pixart-sigma", seed=4)
    step = PIXART.prologue(model, torch.zeros(1, 4, 4, 6), torch.tensor([1.0]), {"context": torch.zeros(1, 3, 64)})
    image = torch.randn(1, 6, 288)
    with torch.no_grad():
        out = PIXART.head(model, image, step)
        shift, scale = (model.scale_shift_table[None] + step.extra["head_temb"][:, None]).chunk(2, dim=1)
        full = model.proj_out(model.norm_out(image) * (1 + scale) + shift)
    assert out.shape == (1, 6, 16)
    assert torch.equal(out, full.unflatten(-1, (4, 8))[..., :4].flatten(-2))


def test_sampling_runs_and_cfg_uses_the_negative():
    """An 8-step KSampler run in VAE space (SD1.5 scale for α): finite, and the negative prompt matters at cfg
    4.5; micro-conditions on one side only still sample (two forwards instead of one batch)."""
    model = DiTModel(PIXART, make_tiny_pixart("tiny-pixart-alpha", seed=5))
    g = torch.Generator().manual_seed(9)
    config = model.config
    pos, neg = pixart_cond(config, 1, 6, g, size=(64, 48)), pixart_cond(config, 1, 4, g)
    latent = torch.zeros(1, 4, 8, 6)
    a = sample(model, pos, latent, seed=3, steps=8, cfg=4.5, negative=neg)
    b = sample(model, pos, latent, seed=3, steps=8, cfg=4.5, negative=pixart_cond(config, 1, 4, g))
    assert torch.isfinite(a).all() and a.shape == latent.shape and rel_err(a, b) > 1e-4
