import math

import pytest
import torch

from comfy_xdit.sampling import (SAMPLERS, SCHEDULERS, DiscreteFlowModelSampling, FluxModelSampling, LatentFormat,
                                 beta_ppf, resolution_shift, get_sampler, ksampler_sigmas, make_sigmas, prepare_mask,
                                 prepare_noise, sample, sample_dpmpp_2m, sample_euler, simple_sigmas)


def flux(mu):
    return FluxModelSampling(mu)


def test_simple_schedule_matches_comfyui_1024px_4_steps():
    mu = resolution_shift((1024 // 16) * (1024 // 16))
    assert mu == pytest.approx(1.15)
    sigmas = simple_sigmas(4, flux(mu))
    assert sigmas.tolist() == pytest.approx([1.0, 0.9045, 0.7595, 0.5128, 0.0], abs=5e-5)


def test_simple_schedule_picks_from_the_table():
    # 10000-entry table sigma(t_i), t_i = i/10000; step j takes entry -(1 + int(j * 10000 / steps))
    mu, steps = 0.8, 7
    sigmas = simple_sigmas(steps, flux(mu))
    for j in range(steps):
        t = (10000 - int(j * 10000 / steps)) / 10000
        assert float(sigmas[j]) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / t - 1), rel=1e-6)
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_shift_is_linear_in_tokens():
    assert resolution_shift(256) == pytest.approx(0.5)
    assert resolution_shift(4096) == pytest.approx(1.15)
    assert resolution_shift(2176) == pytest.approx(0.825)


def test_noise_follows_comfyui_rule():
    torch.manual_seed(123)
    expected = torch.randn(2, 16, 4, 6)
    assert torch.equal(prepare_noise((2, 16, 4, 6), 123), expected)
    # batch_index: one draw per index from 0 upward, kept for the listed ones
    torch.manual_seed(7)
    draws = [torch.randn(1, 16, 4, 6) for _ in range(4)]
    got = prepare_noise((2, 16, 4, 6), 7, batch_index=[3, 1])
    assert torch.equal(got, torch.cat([draws[3], draws[1]]))


def test_latent_format_round_trip():
    fmt = LatentFormat(16, 0.3611, 0.1159)
    x = torch.randn(1, 16, 2, 2)
    assert torch.allclose(fmt.from_model(fmt.to_model(x)), x, atol=1e-6)
    assert torch.allclose(fmt.to_model(torch.zeros(1)), torch.tensor([-0.1159 * 0.3611]))


def test_euler_integrates_a_linear_flow_exactly():
    # With a perfect x0 predictor the flow x_t = t*noise + (1-t)*x0 is straight, so Euler lands on x0.
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    sigmas = simple_sigmas(5, flux(1.0))
    seen = []
    out = sample_euler(lambda x, s: x0, noise, sigmas, callback=lambda i, n, d: seen.append((i, n)))
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_scheduler_and_sampler_names():
    assert SCHEDULERS == ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential")
    assert SAMPLERS == ("euler", "dpmpp_2m")
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(ValueError, match="simple, normal, sgm_uniform, beta"):
        make_sigmas("ddim_uniform", 4, flux(1.0))
    with pytest.raises(ValueError, match="euler, dpmpp_2m"):
        get_sampler("heun")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 5, 28, 100])
def test_every_schedule_starts_at_1_ends_at_0_and_decreases(scheduler, steps):
    sigmas = make_sigmas(scheduler, steps, flux(1.15))
    assert sigmas.dtype == torch.float32
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    # beta drops repeated table picks, so it may come out shorter
    assert len(sigmas) == steps + 1 or (scheduler == "beta" and len(sigmas) <= steps + 1)


def test_normal_shifts_linearly_spaced_sigmas_again():
    # ComfyUI's normal scheduler spaces timesteps evenly and Flux's timestep is sigma, so each
    # value is sigma(t) of an evenly spaced t from 1 to the table's smallest sigma.
    mu, steps = 1.15, 5
    smallest = math.exp(mu) / (math.exp(mu) + 1 / 1e-4 - 1)
    ts = torch.linspace(1.0, smallest, steps).double()
    expected = math.exp(mu) / (math.exp(mu) + 1 / ts - 1)
    assert make_sigmas("normal", steps, flux(mu))[:-1].double().tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    sgm = make_sigmas("sgm_uniform", steps, flux(mu))
    assert len(sgm) == steps + 1 and float(sgm[-2]) > float(make_sigmas("normal", steps, flux(mu))[-2])


def test_beta_ppf_matches_scipy():
    # reference values from scipy.stats.beta.ppf
    cases = {(0.1, 0.6, 0.6): 0.03958440558878085, (0.25, 0.6, 0.6): 0.17568037865269498,
             (0.75, 0.6, 0.6): 0.824319621347305, (0.9, 0.6, 0.6): 0.9604155944112192,
             (1e-4, 0.6, 0.6): 3.998377158137721e-07, (0.9999, 0.6, 0.6): 0.9999996001622842,
             (0.3, 2.0, 0.5): 0.7386793743590722, (0.8, 0.6, 1.5): 0.5243952841380912}
    for (p, a, b), expected in cases.items():
        assert beta_ppf(p, a, b) == pytest.approx(expected, rel=1e-9, abs=1e-14)
    assert beta_ppf(0.5, 0.6, 0.6) == 0.5 and beta_ppf(0.0, 0.6, 0.6) == 0.0 and beta_ppf(1.0, 0.6, 0.6) == 1.0


def test_beta_schedule_at_an_even_step_count_takes_the_median_entry():
    # 0.5 * 9999 = 4999.5 rounds half-to-even to 5000 (scipy's ppf(0.5) is 0.5 or one ulp above)
    table_mid = math.exp(1.0) / (math.exp(1.0) + 1 / 0.5001 - 1)
    assert float(make_sigmas("beta", 2, flux(1.0))[1]) == pytest.approx(table_mid, rel=1e-6)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_denoise_keeps_the_tail_of_a_longer_schedule(scheduler):
    full = make_sigmas(scheduler, int(20 / 0.6), flux(1.15))
    assert torch.equal(ksampler_sigmas(scheduler, 20, flux(1.15), 0.6), full[-21:])
    assert torch.equal(ksampler_sigmas(scheduler, 20, flux(1.15), 0.99995), make_sigmas(scheduler, 20, flux(1.15)))
    assert len(ksampler_sigmas(scheduler, 20, flux(1.15), 0.0)) == 0


def test_dpmpp_2m_integrates_a_linear_flow_exactly():
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    seen = []
    out = sample_dpmpp_2m(lambda x, s: x0, noise, make_sigmas("beta", 6, flux(1.0)),
                          callback=lambda i, n, d: seen.append((i, n)))
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == [(i, 6) for i in range(1, 7)]


def test_dpmpp_2m_last_step_returns_the_denoised_prediction():
    x = torch.randn(1, 4, 2, 2)
    target = torch.randn(1, 4, 2, 2)
    out = sample_dpmpp_2m(lambda x, s: target, x, torch.tensor([1.0, 0.0]))
    assert torch.equal(out, target)


def test_prepare_mask_resizes_and_repeats_like_comfyui():
    pixel = torch.zeros(1, 1, 16, 24)
    pixel[..., :, 12:] = 1.0
    mask = prepare_mask(pixel, (2, 16, 2, 3))
    assert mask.shape == (2, 16, 2, 3)
    assert torch.equal(mask[0, 0], torch.nn.functional.interpolate(pixel, size=(2, 3), mode="bilinear")[0, 0])
    assert torch.equal(mask[1], mask[0]) and torch.equal(mask[0, 15], mask[0, 0])
    assert torch.equal(prepare_mask(torch.ones(4, 6), (1, 16, 4, 6)), torch.ones(1, 16, 4, 6))
    assert prepare_mask(torch.ones(3, 1, 4, 6), (2, 16, 4, 6)).shape == (2, 16, 4, 6)


class _ToyFlux:
    latent_format = LatentFormat(16, 0.3611, 0.1159)

    def __init__(self):
        self.seen = []

    def check_latent(self, shape):
        pass

    def model_sampling(self, shape):
        return FluxModelSampling(1.15)

    def denoiser(self, cond, shape):
        def denoise(x, sigma):
            self.seen.append((x.clone(), sigma))
            # the mean term couples positions, so what is kept steers what is repainted
            return 0.7 * x - 0.1 * torch.sin(3 * x) + 0.2 * x.mean(dim=(2, 3), keepdim=True)
        return denoise


def _latent():
    return torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_mask_of_zeros_keeps_the_input_latent(sampler_name):
    latent = _latent()
    out = sample(_ToyFlux(), {}, latent, 3, 6, sampler_name=sampler_name, scheduler="beta",
                 denoise=0.7, noise_mask=torch.zeros(1, 1, 32, 48))
    torch.testing.assert_close(out, latent, rtol=0, atol=2e-6)  # exact up to the fp32 round trip


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_mask_of_ones_equals_the_unmasked_run(sampler_name):
    latent = _latent()
    kw = dict(sampler_name=sampler_name, scheduler="normal", denoise=0.6)
    plain = sample(_ToyFlux(), {}, latent, 3, 5, **kw)
    masked = sample(_ToyFlux(), {}, latent, 3, 5, noise_mask=torch.ones(4, 6), **kw)
    assert torch.equal(plain, masked)


def test_half_mask_repaints_only_the_masked_side():
    latent = _latent()
    mask = torch.zeros(4, 6)
    mask[:, 3:] = 1.0
    out = sample(_ToyFlux(), {}, latent, 3, 4, noise_mask=mask)
    plain = sample(_ToyFlux(), {}, latent, 3, 4)
    torch.testing.assert_close(out[..., :3], latent[..., :3], rtol=0, atol=2e-6)
    assert not torch.allclose(out[..., 3:], latent[..., 3:]) and not torch.allclose(out[..., 3:], plain[..., 3:])


def test_img2img_starts_from_the_noised_latent():
    latent, model = _latent(), _ToyFlux()
    sample(model, {}, latent, 9, 4, denoise=0.6)
    sigmas = ksampler_sigmas("simple", 4, flux(1.15), 0.6)
    noise = prepare_noise(tuple(latent.shape), 9)
    start = sigmas[0] * noise + (1.0 - sigmas[0]) * model.latent_format.to_model(latent)
    assert len(model.seen) == 4 and model.seen[0][1] == float(sigmas[0]) < 1.0
    assert torch.equal(model.seen[0][0], start)


def test_empty_latent_is_not_shifted_into_model_space():
    # ComfyUI skips process_latent_in for an all-zero latent, so kept regions come back as the shift.
    out = sample(_ToyFlux(), {}, torch.zeros(1, 16, 4, 6), 3, 4, denoise=0.5,
                 noise_mask=torch.zeros(4, 6))
    torch.testing.assert_close(out, torch.full_like(out, 0.1159), rtol=0, atol=2e-6)


def test_denoise_zero_returns_the_input_and_unknown_names_raise():
    latent = _latent()
    out = sample(_ToyFlux(), {}, latent, 3, 4, denoise=0.0)
    assert torch.equal(out, latent) and out is not latent
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(_ToyFlux(), {}, latent, 3, 4, sampler_name="lms")
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample(_ToyFlux(), {}, latent, 3, 4, scheduler="ddim_uniform")


def test_discrete_flow_model_sampling_maps_timesteps_by_the_multiplier():
    s = DiscreteFlowModelSampling(3.0)
    assert len(s.sigmas) == 1000 and s.sigmas.dtype == torch.float32
    assert float(s.sigma_max) == 1.0 and float(s.sigma_min) == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-6)
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])
    sig = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(s.timestep(sig), sig * 1000)
    torch.testing.assert_close(s.sigma(s.timestep(sig)), 3 * sig / (1 + 2 * sig))
    assert (s.percent_to_sigma(0.0), s.percent_to_sigma(1.0), s.percent_to_sigma(0.5)) == (1.0, 0.0, 0.75)
    aura = DiscreteFlowModelSampling(1.73, multiplier=1.0)
    assert torch.equal(aura.timestep(sig), sig) and torch.equal(aura.sigmas, DiscreteFlowModelSampling(1.73).sigmas)


def test_flux_model_sampling_is_comfyuis_flux_table():
    s = FluxModelSampling(1.15)
    assert len(s.sigmas) == 10000 and float(s.sigma_max) == 1.0
    sigma = s.sigmas[5]
    assert s.timestep(sigma) is sigma
    assert s.percent_to_sigma(0.25) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1 / 0.75 - 1))


@pytest.mark.parametrize("model_sampling", [FluxModelSampling(1.15), DiscreteFlowModelSampling(3.0)])
def test_const_prediction_helpers(model_sampling):
    g = torch.Generator().manual_seed(2)
    x, v, noise = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    per_item = torch.tensor([0.25, 0.75])
    for sigma in (0.4, torch.tensor(0.4), torch.tensor([0.4])):
        assert torch.equal(model_sampling.calculate_denoised(sigma, v, x), x - v * 0.4)
        assert torch.equal(model_sampling.noise_scaling(sigma, noise, x), 0.4 * noise + (1.0 - 0.4) * x)
        assert torch.equal(model_sampling.inverse_noise_scaling(sigma, x), x / (1.0 - 0.4))
    column = per_item.view(2, 1, 1, 1)
    assert torch.equal(model_sampling.calculate_denoised(per_item, v, x), x - v * column)
    assert torch.equal(model_sampling.noise_scaling(per_item, noise, x), column * noise + (1.0 - column) * x)
    assert torch.equal(model_sampling.inverse_noise_scaling(per_item, x), x / (1.0 - column))
    assert torch.equal(model_sampling.inverse_noise_scaling(torch.tensor(0.0), x), x)


def test_schedulers_take_a_model_sampling_not_a_number():
    with pytest.raises(TypeError, match=r"FluxModelSampling\(1.15\)"):
        make_sigmas("simple", 4, 1.15)
    sd3 = DiscreteFlowModelSampling(3.0)
    assert make_sigmas("simple", 4, sd3).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert torch.equal(ksampler_sigmas("beta", 10, sd3, 0.5), make_sigmas("beta", 20, sd3)[-11:])


class _Recorder:
    """A model adapter that records which conditioning dict each denoiser was built for."""

    latent_format = LatentFormat(16, 1.5305, 0.0609)

    def __init__(self):
        self.built, self.sampling_shapes = [], []

    def check_latent(self, shape):
        pass

    def model_sampling(self, shape):
        self.sampling_shapes.append(shape)
        return DiscreteFlowModelSampling(3.0)

    def denoiser(self, cond, shape):
        self.built.append((cond, shape))
        bias = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)  # one value per batch row
        return lambda x, sigma: 0.5 * x + bias


def test_sample_hands_the_conditioning_dicts_to_the_model_as_they_are():
    model, latent = _Recorder(), torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    pos = {"context": torch.ones(1, 3, 8), "pooled": torch.zeros(2, 5), "guidance": torch.tensor([3.5])}
    neg = {"context": -torch.ones(2, 4, 8), "pooled": torch.zeros(1, 5), "guidance": torch.tensor([3.5])}
    guided = sample(model, pos, latent, 4, 3, cfg=2.5, negative=neg)  # text lengths differ: two forwards
    assert [c for c, _ in model.built] == [pos, neg] and all(s == (2, 16, 4, 4) for _, s in model.built)
    assert model.built[0][0] is pos and model.built[1][0] is neg and model.sampling_shapes == [(2, 16, 4, 4)]
    plain = sample(_Recorder(), pos, latent, 4, 3, negative=neg)  # cfg 1: the negative is not run
    assert not torch.allclose(guided, plain)
    manual = _Recorder()
    manual.denoiser = lambda cond, shape: (lambda x, s: (0.5 * x - 1.0) + ((0.5 * x + 1.0) - (0.5 * x - 1.0)) * 2.5)
    assert torch.equal(guided, sample(manual, pos, latent, 4, 3))


def test_cond_and_uncond_of_one_shape_run_as_one_batch():
    """As ComfyUI batches them: one denoiser over [cond rows | uncond rows], each row its own conditioning."""
    model, latent = _Recorder(), torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    pos = {"context": torch.ones(1, 3, 8), "pooled": torch.arange(10.0).view(2, 5)}
    neg = {"context": -torch.ones(2, 3, 8), "pooled": torch.zeros(1, 5)}
    guided = sample(model, pos, latent, 4, 3, cfg=2.5, negative=neg)
    ((cond, shape),) = model.built
    assert shape == (4, 16, 4, 4)
    assert torch.equal(cond["context"], torch.cat([torch.ones(2, 3, 8), -torch.ones(2, 3, 8)]))
    assert torch.equal(cond["pooled"], torch.cat([torch.arange(10.0).view(2, 5), torch.zeros(2, 5)]))
    manual = _Recorder()
    manual.denoiser = lambda cond, shape: (lambda x, s: (0.5 * x - 1.0) + ((0.5 * x + 1.0) - (0.5 * x - 1.0)) * 2.5)
    assert torch.equal(guided, sample(manual, pos, latent, 4, 3))


def test_sample_keeps_its_conditioning_errors():
    latent = torch.zeros(3, 16, 4, 4)
    pos = {"context": torch.ones(1, 3, 8)}
    with pytest.raises(ValueError, match="cfg 2.0 needs a negative conditioning"):
        sample(_Recorder(), pos, latent, 1, 2, cfg=2.0)
    with pytest.raises(ValueError, match="conditioning batch 2 does not divide latent batch 3"):
        sample(_Recorder(), {"context": torch.ones(2, 3, 8)}, latent, 1, 2)
    with pytest.raises(ValueError, match="conditioning batch 2 does not divide latent batch 3"):
        sample(_Recorder(), pos, latent, 1, 2, cfg=2.0, negative={"context": torch.ones(2, 3, 8)})
    sample(_Recorder(), pos, latent, 1, 2, negative={"context": torch.ones(2, 3, 8)})  # unused at cfg 1
    with pytest.raises(TypeError, match="positive must be a conditioning dict"):
        sample(_Recorder(), torch.ones(1, 3, 8), latent, 1, 2)


# ComfyUI 0.3.64's ModelSamplingFlux.patch (comfy_extras/nodes_model_advanced.py): x1 = 256, x2 = 4096,
# mm = (max_shift - base_shift) / (x2 - x1), b = base_shift - mm * x1, shift = (width * height / (8*8*2*2)) * mm + b,
# evaluated once in ComfyUI's Python for these inputs (max_shift, base_shift, width, height) -> shift.
COMFY_FLUX_NODE_SHIFTS = {(1.15, 0.5, 1024, 1024): 1.15, (1.15, 0.5, 128, 128): 0.46749999999999997,
                          (1.15, 0.5, 768, 512): 0.7166666666666666, (1.15, 0.5, 2048, 2048): 3.2299999999999995,
                          (2.0, 0.3, 1344, 768): 1.9716666666666667}


@pytest.mark.parametrize("inputs", list(COMFY_FLUX_NODE_SHIFTS))
def test_resolution_shift_is_comfyuis_model_sampling_flux_node_to_the_bit(inputs):
    max_shift, base_shift, width, height = inputs
    got = resolution_shift(width * height / 256, base_shift=base_shift, max_shift=max_shift)
    assert got == COMFY_FLUX_NODE_SHIFTS[inputs]  # exact: the same operations in the same order


def test_flux_samples_at_comfyuis_constant_shift_at_every_size():
    """KSampler on a Flux checkpoint without ModelSamplingFlux: shift 1.15 (dev) / 1.0 (schnell) at any size."""
    from comfy_xdit.models.flux import FLUX

    dev, schnell = FLUX.preset_config("flux-dev"), FLUX.preset_config("flux-schnell")
    for shape in ((1, 16, 16, 16), (1, 16, 128, 128), (1, 16, 256, 192)):
        assert FLUX.model_sampling(dev, shape).shift == 1.15 and FLUX.model_sampling(schnell, shape).shift == 1.0
    assert FLUX.model_sampling(dev, (1, 16, 16, 16), shift=0.4675).shift == 0.4675  # the node's override
