"""Qwen-Image's model sampling and latent format against numbers from ComfyUI 0.3.64's own functions.

The literals were produced once on CPU by ComfyUI itself (torch 2.14.1, scipy 1.17.1):
- FLUX_*: comfy.model_base.model_sampling(comfy.supported_models.QwenImage config, ModelType.FLUX) (what
  model_base.QwenImage builds: ModelSamplingFlux + CONST, sampling_settings shift 1.15, multiplier 1.0);
- AURA_*: ModelSamplingAuraFlow's patch at shift 3.1 (ModelSamplingSD3.patch with multiplier=1.0: a
  ModelSamplingDiscreteFlow + CONST, set_parameters(shift=3.1, multiplier=1.0));
- for each: comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps) (SCHEDULES), the sigma table's
  length and ends (TABLE), timestep(sigma), sigma(timestep) and percent_to_sigma(percent);
- comfy.latent_formats.Wan21 (the latent format supported_models.QwenImage names): its latents_mean / std
  (written in ComfyUI's source as below) and process_in / process_out of X below.
Schedules are compared bit for bit (9 significant digits round-trip an fp32), every scheduler of
sampling.SCHEDULERS at two step counts or more.
"""

import pytest
import torch

from comfy_xdit.models.qwen import QWEN
from comfy_xdit.sampling import SCHEDULERS, DiscreteFlowModelSampling, FluxModelSampling, make_sigmas

FLUX_TABLE = (10000, [0.000315751153, 0.000631366041, 0.000946844812], [0.99993664, 0.99996835, 1.0])
FLUX_SCHEDULES = {
    ('simple', 1): [1.0, 0.0],
    ('simple', 4): [1.0, 0.904530764, 0.759510934, 0.512844086, 0.0],
    ('simple', 20): [
        1.0, 0.983608067, 0.966013849, 0.947080016, 0.926647365, 0.904530764, 0.880513072, 0.854338169,
        0.825701594, 0.794239223, 0.759510934, 0.720980287, 0.677986741, 0.629707098, 0.575102985, 0.512844086,
        0.44119978, 0.357874572, 0.259758413, 0.142529353, 0.0],
    ('normal', 5): [1.0, 0.904567122, 0.759626269, 0.513159573, 0.000996524002, 0.0],
    ('normal', 30): [
        1.0, 0.988821685, 0.977090538, 0.964764774, 0.951797724, 0.938138366, 0.923729479, 0.908507705,
        0.892402291, 0.875333846, 0.857213378, 0.837940693, 0.817402124, 0.795468807, 0.771993697, 0.746808231,
        0.719718337, 0.690499663, 0.658890963, 0.624586523, 0.587225974, 0.546382189, 0.50154382, 0.452095121,
        0.397286206, 0.336195648, 0.267677993, 0.190291017, 0.102193505, 0.000996524002, 0.0],
    ('beta', 6): [1.0, 0.969095409, 0.892582417, 0.75958395, 0.545648992, 0.241540268, 0.0],
    ('beta', 12): [
        1.0, 0.990532994, 0.969095409, 0.936775744, 0.892582417, 0.834454775, 0.75958395, 0.664382994,
        0.545648992, 0.402498275, 0.241540268, 0.0873109251, 0.0],
    ('sgm_uniform', 3): [1.0, 0.863376379, 0.612492085, 0.0],
    ('sgm_uniform', 8): [
        1.0, 0.956738651, 0.904567122, 0.840416551, 0.759626269, 0.654757202, 0.513159573, 0.311441988, 0.0],
    ('karras', 4): [1.0, 0.163504809, 0.0141184488, 0.000315750949, 0.0],
    ('karras', 9): [
        1.0, 0.534998238, 0.26917091, 0.125664175, 0.0534502752, 0.0201817192, 0.00650803233, 0.00168599386,
        0.000315750949, 0.0],
    ('exponential', 5): [1.0, 0.133301854, 0.0177693851, 0.00236869208, 0.000315751066, 0.0],
    ('exponential', 9): [
        1.0, 0.365105271, 0.133301854, 0.0486692116, 0.0177693851, 0.00648769783, 0.00236869208, 0.000864821777,
        0.000315751066, 0.0],
}
FLUX_TIMESTEPS = {1.0: 1.0, 0.5: 0.5, 0.1234567: 0.123456702}
FLUX_SIGMA = {1.0: 1.0, 0.5: 0.759510934, 0.1234567: 0.30787012}
FLUX_PERCENTS = {0.0: 1.0, 0.25: 0.9045307667386396, 0.5: 0.7595109169491111, 0.9: 0.2597584141943305, 1.0: 0.0}

AURA_SHIFT = 3.1
AURA_TABLE = (1000, [0.00309350365, 0.00617406936, 0.00924177747], [0.999354005, 0.999677241, 1.0])
AURA_SCHEDULES = {
    ('simple', 1): [1.0, 0.0],
    ('simple', 4): [1.0, 0.902912617, 0.756097555, 0.508196712, 0.0],
    ('simple', 20): [
        1.0, 0.983305514, 0.965397894, 0.94614011, 0.925373197, 0.902912617, 0.878542542, 0.852008462,
        0.823008835, 0.791183352, 0.756097555, 0.717223585, 0.673913062, 0.62536025, 0.57055217, 0.508196712,
        0.436619729, 0.353612155, 0.256198347, 0.140271485, 0.0],
    ('normal', 5): [1.0, 0.903274, 0.757236779, 0.511279523, 0.00952796452, 0.0],
    ('normal', 30): [
        1.0, 0.988646507, 0.976738513, 0.964234173, 0.951087773, 0.93724823, 0.922659397, 0.907258987,
        0.890976965, 0.873735607, 0.855447352, 0.836014152, 0.815324843, 0.793253541, 0.769657075, 0.744371831,
        0.717209399, 0.687952995, 0.656350613, 0.6221084, 0.584881127, 0.544260681, 0.499760896, 0.450798333,
        0.396666169, 0.3364999, 0.26923123, 0.193523556, 0.107682601, 0.00952796452, 0.0],
    ('beta', 6): [1.0, 0.968716741, 0.890981138, 0.756834447, 0.541656077, 0.239021122, 0.0],
    ('beta', 12): [
        1.0, 0.990457714, 0.968716741, 0.935540557, 0.890981138, 0.831987739, 0.756834447, 0.66088587,
        0.541656077, 0.400014549, 0.239021122, 0.0874882415, 0.0],
    ('sgm_uniform', 3): [1.0, 0.861665487, 0.610049725, 0.0],
    ('sgm_uniform', 8): [
        1.0, 0.956095934, 0.903274, 0.83850956, 0.757236779, 0.652221262, 0.511279523, 0.312171638, 0.0],
    ('karras', 4): [1.0, 0.234105021, 0.0373975076, 0.00309350272, 0.0],
    ('karras', 9): [
        1.0, 0.600580156, 0.346527725, 0.190778539, 0.0993441939, 0.0483723544, 0.0216869395, 0.00876275823,
        0.00309350272, 0.0],
    ('exponential', 5): [1.0, 0.235837385, 0.0556192733, 0.013117101, 0.00309350365, 0.0],
    ('exponential', 9): [
        1.0, 0.485630929, 0.235837385, 0.114529915, 0.0556192733, 0.0270104427, 0.013117101, 0.00637007086,
        0.00309350365, 0.0],
}
AURA_TIMESTEPS = {1.0: 1.0, 0.5: 0.5, 0.1234567: 0.123456702}
AURA_SIGMA = {1.0: 1.0, 0.5: 0.756097555, 0.1234567: 0.303921372}
AURA_PERCENTS = {0.0: 1.0, 0.25: 0.9029126213592233, 0.5: 0.7560975609756099, 0.9: 0.256198347107438, 1.0: 0.0}

WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
X = torch.arange(32, dtype=torch.float32).view(1, 16, 1, 1, 2) / 8 - 2
PROCESS_IN = [
    -0.440994918, -0.39664349, -0.715975523, -0.630011678, -0.25293231, -0.199226633, -0.511145353, -0.464078575,
    -0.676861286, -0.574368656, -0.968658268, -0.898068726, -0.133694142, -0.0857131854, -0.868148267,
    -0.807886958, -0.126472294, -0.0882307962, 0.149354264, 0.207423583, -0.0180441141, 0.0255828574,
    0.714551628, 0.794787824, 0.727749944, 0.804053187, 1.95476747, 2.06584883, 0.44235605, 0.486602277,
    1.06581414, 1.13105428]
PROCESS_OUT = [
    -6.39389992, -6.04159975, -3.25357509, -3.07181239, -4.40255022, -4.1116128, -3.21224999, -2.88027501,
    -1.39409995, -1.24164999, -0.362799942, -0.141449988, -1.45430005, -1.12865007, 1.03222489, 1.29151249,
    0.413399994, 0.82198751, 0.466650009, 0.735724986, 1.98430002, 2.34245014, 0.805224955, 0.999962509,
    1.4460001, 1.65077496, 0.456925035, 0.597587585, 4.48794985, 4.84108734, 3.06089997, 3.30040002]

CONFIG = QWEN.preset_config("qwen-image")
SHAPE = (1, 16, 1, 128, 128)  # a 1024 x 1024 image
CASES = {"flux": (None, FLUX_TABLE, FLUX_SCHEDULES, FLUX_TIMESTEPS, FLUX_SIGMA, FLUX_PERCENTS),
         "auraflow": (AURA_SHIFT, AURA_TABLE, AURA_SCHEDULES, AURA_TIMESTEPS, AURA_SIGMA, AURA_PERCENTS)}


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_the_sampling_kinds():
    """Shift None: ModelSamplingFlux at 1.15 whatever the size (no resolution shift, unlike Flux's node);
    a shift: discrete flow at multiplier 1.0 (the transformer takes sigma, not sigma * 1000)."""
    flux = QWEN.model_sampling(CONFIG, SHAPE)
    assert isinstance(flux, FluxModelSampling) and flux.shift == 1.15
    small = QWEN.model_sampling(QWEN.preset_config("tiny-qwen-image"), (1, 16, 1, 8, 12))
    assert torch.equal(small.sigmas, flux.sigmas)
    aura = QWEN.model_sampling(CONFIG, SHAPE, shift=AURA_SHIFT)
    assert isinstance(aura, DiscreteFlowModelSampling) and (aura.shift, aura.multiplier) == (AURA_SHIFT, 1.0)


@pytest.mark.parametrize("kind", list(CASES))
def test_table_timestep_sigma_and_percent_equal_comfyuis(kind):
    shift, (size, first, last), _, timesteps, sigmas, percents = CASES[kind]
    s = QWEN.model_sampling(CONFIG, SHAPE, shift=shift)
    assert len(s.sigmas) == size and s.sigmas.dtype == torch.float32
    assert torch.equal(s.sigmas[:3], _f32(first)) and torch.equal(s.sigmas[-3:], _f32(last))
    for sigma, t in timesteps.items():
        assert torch.equal(s.timestep(torch.tensor(sigma)), torch.tensor(t)), sigma
    for t, sigma in sigmas.items():
        assert torch.equal(s.sigma(torch.tensor(t)), torch.tensor(sigma)), t
    for p, sigma in percents.items():
        assert s.percent_to_sigma(p) == pytest.approx(sigma, abs=1e-12), p


@pytest.mark.parametrize("kind,scheduler,steps", [(k, *c) for k in CASES for c in CASES[k][2]])
def test_sigmas_equal_comfyuis(kind, scheduler, steps):
    shift, _, schedules = CASES[kind][:3]
    got = make_sigmas(scheduler, steps, QWEN.model_sampling(CONFIG, SHAPE, shift=shift))
    assert torch.equal(got, _f32(schedules[(scheduler, steps)])), got


def test_every_scheduler_is_compared():
    for kind in CASES:
        assert {s for s, _ in CASES[kind][2]} == set(SCHEDULERS)


def test_latent_format_is_comfyuis_wan21():
    fmt = QWEN.latent_format
    assert (fmt.channels, fmt.scale, fmt.dims) == (16, 1.0, 3)
    assert torch.equal(_f32(fmt.mean), _f32(WAN21_MEAN)) and torch.equal(_f32(fmt.std), _f32(WAN21_STD))
    assert torch.allclose(fmt.to_model(X).flatten(), _f32(PROCESS_IN), rtol=1e-6, atol=1e-7)
    assert torch.allclose(fmt.from_model(X).flatten(), _f32(PROCESS_OUT), rtol=1e-6, atol=1e-7)
    assert QWEN.latent_format_for(CONFIG) is fmt
