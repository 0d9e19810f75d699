"""Wan's model sampling against numbers from ComfyUI 0.3.64's own functions.

The literals were produced once on CPU by ComfyUI itself: comfy.model_base.model_sampling for
comfy.supported_models.WAN21_T2V (ModelSamplingDiscreteFlow, shift 8.0, multiplier 1000; every Wan 2.1 / 2.2
config inherits these sampling_settings), comfy.samplers.calculate_sigmas for each scheduler, and the model
sampling's timestep() and percent_to_sigma(). The live comparison with ComfyUI's code over many more cases is
the real-server test (tests/comfyui/test_comfyui_wan.py: Sampler (xDiT) vs KSampler).
"""

import pytest
import torch

from comfy_xdit.models.wan import WAN
from comfy_xdit.sampling import make_sigmas

SCHEDULES = {
    ("simple", 4): [1.0, 0.96, 0.8888889, 0.7272727, 0.0],
    ("normal", 5): [1.0, 0.9604058, 0.8904485, 0.7334815, 0.060207, 0.0],
    ("beta", 6): [1.0, 0.9876409, 0.9547325, 0.8892833, 0.7530696, 0.4476885, 0.0],
    ("sgm_uniform", 3): [1.0, 0.9418341, 0.8037714, 0.0],
}
TIMESTEPS = {1.0: 1000.0, 0.5: 500.0, 0.1234567: 123.4567}
PERCENTS = {0.0: 1.0, 0.25: 0.96, 0.5: 0.8888889, 0.9: 0.4705882}


@pytest.fixture(scope="module")
def sampling():
    config = WAN.preset_config("wan2.1-t2v-14b")
    return WAN.model_sampling(config, (1, 16, 21, 60, 104))


@pytest.mark.parametrize("scheduler,steps", list(SCHEDULES))
def test_sigmas_equal_comfyuis(sampling, scheduler, steps):
    got = make_sigmas(scheduler, steps, sampling)
    assert torch.allclose(got, torch.tensor(SCHEDULES[(scheduler, steps)]), atol=2e-6), got


def test_timestep_and_percent(sampling):
    for sigma, t in TIMESTEPS.items():
        assert float(sampling.timestep(torch.tensor(sigma))) == pytest.approx(t, abs=1e-3)
    for p, sigma in PERCENTS.items():
        assert sampling.percent_to_sigma(p) == pytest.approx(sigma, abs=2e-6)


def test_shift_override_and_every_release():
    for preset in ("wan2.1-t2v-1.3b", "wan2.1-i2v-14b", "wan2.2-ti2v-5b"):
        assert WAN.model_sampling(WAN.preset_config(preset), (1, 16, 2, 4, 4)).shift == 8.0
    assert WAN.model_sampling(WAN.preset_config("wan2.1-t2v-14b"), (1, 16, 2, 4, 4), shift=5.0).shift == 5.0
