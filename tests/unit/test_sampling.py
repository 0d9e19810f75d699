import math

import pytest
import torch

from comfy_xdit.sampling import (LatentFormat, flux_shift_mu, prepare_noise, sample_euler, simple_sigmas)


def test_simple_schedule_matches_comfyui_1024px_4_steps():
    mu = flux_shift_mu((1024 // 16) * (1024 // 16))
    assert mu == pytest.approx(1.15)
    sigmas = simple_sigmas(4, mu)
    assert sigmas.tolist() == pytest.approx([1.0, 0.9045, 0.7595, 0.5128, 0.0], abs=5e-5)


def test_simple_schedule_picks_from_the_table():
    # 10000-entry table sigma(t_i), t_i = i/10000; step j takes entry -(1 + int(j * 10000 / steps))
    mu, steps = 0.8, 7
    sigmas = simple_sigmas(steps, mu)
    for j in range(steps):
        t = (10000 - int(j * 10000 / steps)) / 10000
        assert float(sigmas[j]) == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / t - 1), rel=1e-6)
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_shift_is_linear_in_tokens():
    assert flux_shift_mu(256) == pytest.approx(0.5)
    assert flux_shift_mu(4096) == pytest.approx(1.15)
    assert flux_shift_mu(2176) == pytest.approx(0.825)


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
    sigmas = simple_sigmas(5, 1.0)
    seen = []
    out = sample_euler(lambda x, s: x0, noise, sigmas, callback=lambda i, n, d: seen.append((i, n)))
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == [(i, 5) for i in range(1, 6)]
