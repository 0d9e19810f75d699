"""ComfyUI's discrete DDPM model sampling (ModelSamplingDiscrete with EPS / V_PREDICTION) against numbers from
ComfyUI 0.3.64's own functions.

The literals were produced once on CPU by ComfyUI itself: ModelSamplingDiscrete with PixArt's sampling_settings
(sqrt_linear betas 1e-4..0.02) and EPS, and with HunyuanDiT's (linear 0.00085..0.018) and V_PREDICTION;
comfy.samplers.calculate_sigmas for each scheduler at 7 steps, timestep() and percent_to_sigma(). At the time
the whole tables, 4/7/20 steps of every scheduler, sigma(t) at fractional t, calculate_input, calculate_denoised
and noise_scaling (both max_denoise branches) were compared and equal to the last bit.
"""

import pytest
import torch

from comfy_xdit.sampling import DiscreteModelSampling, make_sigmas, max_denoise

SETTINGS = {"pixart": ("sqrt_linear", 0.0001, 0.02, "eps"), "hydit": ("linear", 0.00085, 0.018, "v")}
COMFY = {
    "pixart": {"simple": [157.407288, 41.505295, 13.298708, 5.171376, 2.35253, 1.149413, 0.491981, 0.0],
               "normal": [157.407257, 33.663429, 9.488921, 3.433539, 1.462357, 0.585605, 0.01, 0.0],
               "sgm_uniform": [157.407257, 41.249199, 13.257428, 5.166956, 2.354251, 1.151926, 0.494635, 0.0],
               "beta": [157.407288, 78.792961, 22.28009, 6.097201, 2.05138, 0.798975, 0.244681, 0.0],
               "karras": [157.407242, 61.931664, 21.105408, 5.911205, 1.246326, 0.167854, 0.01, 0.0],
               "exponential": [157.407257, 31.443014, 6.280927, 1.254652, 0.250624, 0.050064, 0.01, 0.0],
               "timestep": [727, 492, 144, 8], "pct": [25.569847, 3.433539, 0.341915]},
    "hydit": {"simple": [45.383621, 14.319136, 5.747718, 2.801092, 1.544221, 0.885856, 0.463461, 0.0],
              "normal": [45.383617, 12.04699, 4.433308, 2.05796, 1.069288, 0.527124, 0.029167, 0.0],
              "sgm_uniform": [45.383617, 14.245733, 5.733878, 2.799292, 1.545085, 0.88737, 0.465286, 0.0],
              "beta": [45.383621, 24.649532, 8.626644, 3.170762, 1.390124, 0.667518, 0.285305, 0.0],
              "karras": [45.383614, 20.336924, 8.212086, 2.896681, 0.851128, 0.192692, 0.029167, 0.0],
              "exponential": [45.383617, 13.332094, 3.916494, 1.150526, 0.337984, 0.099288, 0.029167, 0.0],
              "timestep": [860, 606, 156, 1], "pct": [9.634428, 2.05796, 0.357787]},
}
SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta", "karras", "exponential")


def _sampling(name):
    schedule, start, end, prediction = SETTINGS[name]
    return DiscreteModelSampling(schedule, start, end, prediction=prediction)


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sigmas_equal_comfyuis(name, scheduler):
    got = make_sigmas(scheduler, 7, _sampling(name))
    want = torch.tensor(COMFY[name][scheduler])
    assert torch.allclose(got, want, rtol=2e-6, atol=2e-6), (got, want)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_timestep_and_percent_equal_comfyuis(name):
    s = _sampling(name)
    assert s.timestep(torch.tensor([14.6, 3.3, 0.5, 0.04])).tolist() == COMFY[name]["timestep"]
    for p, want in zip((0.2, 0.5, 0.9), COMFY[name]["pct"]):
        assert s.percent_to_sigma(p) == pytest.approx(want, rel=2e-6)
    assert s.percent_to_sigma(0.0) > 1e8 and s.percent_to_sigma(1.0) == 0.0
    # a timestep maps back to its own table sigma (the MODEL path's input_sigma -> the family's timestep)
    t = torch.tensor([0, 17, 500, 999])
    assert s.timestep(s.input_sigma(t)).tolist() == t.tolist()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_conversions(name):
    s = _sampling(name)
    x, out, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([3.3, 0.7])
    scale = (sigma ** 2 + 1).sqrt().view(2, 1, 1, 1)
    assert torch.allclose(s.calculate_input(sigma, x), x / scale)
    if s.prediction == "eps":
        assert torch.allclose(s.calculate_denoised(sigma, out, x), x - out * sigma.view(2, 1, 1, 1))
    else:
        assert torch.allclose(s.calculate_denoised(sigma, out, x),
                              x / scale ** 2 - out * sigma.view(2, 1, 1, 1) / scale)
    noise, latent = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    top = s.sigma_max
    assert torch.allclose(s.noise_scaling(top, noise, latent, True), noise * (1 + top ** 2).sqrt() + latent)
    assert torch.allclose(s.noise_scaling(top, noise, latent, False), noise * top + latent)
    assert max_denoise(s, torch.tensor([float(top), 1.0])) and not max_denoise(s, torch.tensor([10.0, 1.0]))
