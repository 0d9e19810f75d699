"""Parity with ComfyUI's KSampler for SD3 (ModelSamplingDiscreteFlow), against numbers from ComfyUI's own code.

Every literal below was produced once by ComfyUI 0.3.64 on CPU (torch 2.13.0+cpu, scipy 1.17.1, numpy 2.4.6):
- the model sampling as ComfyUI builds it for SD3: comfy.model_base.model_sampling(config with
  comfy.supported_models.SD3.sampling_settings, ModelType.FLOW), a ModelSamplingDiscreteFlow + CONST at
  shift 3.0; other shifts as the ModelSamplingSD3 node's patch sets them (set_parameters(shift, multiplier=1000)).
  TABLES holds its sigmas, percent_to_sigma, timestep and sigma;
- comfy.samplers.calculate_sigmas (SCHEDULES) and comfy.samplers.KSampler(...).sigmas at denoise 0.6 (DENOISE_0_6);
- comfy.k_diffusion.sampling.sample_euler / sample_dpmpp_2m driven by the toy denoiser below (SAMPLER_RUNS);
- comfy.samplers.ksampler(name).sample (KSAMPLER, so KSamplerX0Inpaint with BaseModel.scale_latent_inpaint),
  comfy.sample.prepare_noise, comfy.sampler_helpers.prepare_mask and comfy.latent_formats.SD3's
  process_in / process_out, driven by the toy denoiser (KSAMPLER_RUNS: first two channels, channel sums).
Shift 0.005 takes the normal scheduler's "sigma(end) close to 0" branch (the schedule ends near the table's
smallest sigma instead of an appended 0). That branch tests sigma(timestep(sigma_min)), which for discrete flow
shifts the smallest sigma a second time (about shift^2 / 1000), so it fires for shifts below about 0.09995.

Where ComfyUI's source can be imported in this process (COMFYUI_DIR, else ../shared/comfyui beside the
repository) together with what it imports (einops, scipy, torchsde, psutil, torchvision, ...), the live tests
also compare against its functions directly, over more cases; otherwise they skip with the reason.
"""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_xdit.sampling import (SCHEDULERS, DiscreteFlowModelSampling, FluxModelSampling, LatentFormat, get_sampler,
                                 ksampler_sigmas, make_sigmas, sample)

SD3_FORMAT = LatentFormat(16, 1.5305, 0.0609)
SD3_SHIFT = 3.0  # SD3's sampling_settings

PERCENTS = (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)
SIGMAS_IN = (1.0, 0.5, 0.1234567)
TIMESTEPS_IN = (1000.0, 500.0, 123.4567, 1.0)

TABLES = {  # shift: (first 5 sigmas, last 5, percent_to_sigma(PERCENTS), timestep(SIGMAS_IN), sigma(TIMESTEPS_IN))
    3.0: (
        [0.002994012, 0.005976096, 0.008946321, 0.011904762, 0.014851485],
        [0.99866307, 0.998998, 0.9993324, 0.9996664, 1.0],
        [1.0, 0.9642857142857144, 0.9, 0.75, 0.24999999999999994, 0.0],
        [1000.0, 500.0, 123.4567],
        [1.0, 0.75, 0.29702953, 0.002994012],
    ),
    1.0: (
        [0.001, 0.002, 0.003, 0.004, 0.005],
        [0.996, 0.997, 0.998, 0.999, 1.0],
        [1.0, 0.9, 0.75, 0.5, 0.09999999999999998, 0.0],
        [1000.0, 500.0, 123.4567],
        [1.0, 0.5, 0.1234567, 0.001],
    ),
    6.0: (
        [0.0059701493, 0.0118811885, 0.01773399, 0.023529412, 0.029268293],
        [0.99933106, 0.9994988, 0.99966604, 0.9998332, 1.0],
        [1.0, 0.9818181818181819, 0.9473684210526315, 0.8571428571428571, 0.3999999999999999, 0.0],
        [1000.0, 500.0, 123.4567],
        [1.0, 0.85714287, 0.45801502, 0.0059701493],
    ),
}

SCHEDULES = {
    ('simple', 3.0, 1): [1.0, 0.0],
    ('simple', 3.0, 4): [1.0, 0.9, 0.75, 0.5, 0.0],
    ('simple', 3.0, 20): [
        1.0, 0.9827586, 0.9642857, 0.9444445, 0.923077, 0.9, 0.87499994, 0.84782606, 0.8181818, 0.7857144, 0.75,
        0.7105263, 0.6666667, 0.617647, 0.5625, 0.5, 0.42857146, 0.3461539, 0.25, 0.13636364, 0.0
    ],
    ('simple', 3.0, 28): [
        1.0, 0.98805463, 0.9751575, 0.9615936, 0.94771713, 0.93267775, 0.91679627, 0.9, 0.8827161, 0.86386776,
        0.843832, 0.8231046, 0.80037314, 0.7760618, 0.75, 0.7227979, 0.69268024, 0.6601344, 0.6258741, 0.5875912,
        0.5458015, 0.5, 0.4510489, 0.39543444, 0.33359253, 0.26644737, 0.18881117, 0.10074626, 0.0
    ],
    ('simple', 1.0, 1): [1.0, 0.0],
    ('simple', 1.0, 4): [1.0, 0.75, 0.5, 0.25, 0.0],
    ('simple', 1.0, 20): [
        1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1,
        0.05, 0.0
    ],
    ('simple', 1.0, 28): [
        1.0, 0.965, 0.929, 0.893, 0.858, 0.822, 0.786, 0.75, 0.715, 0.679, 0.643, 0.608, 0.572, 0.536, 0.5, 0.465,
        0.429, 0.393, 0.358, 0.322, 0.286, 0.25, 0.215, 0.179, 0.143, 0.108, 0.072, 0.036, 0.0
    ],
    ('simple', 6.0, 1): [1.0, 0.0],
    ('simple', 6.0, 4): [1.0, 0.94736844, 0.85714287, 0.6666667, 0.0],
    ('simple', 6.0, 20): [
        1.0, 0.99130434, 0.98181814, 0.97142863, 0.96000004, 0.94736844, 0.9333333, 0.917647, 0.90000004,
        0.88000005, 0.85714287, 0.8307692, 0.8, 0.76363635, 0.72, 0.6666667, 0.6, 0.51428574, 0.4, 0.24000001, 0.0
    ],
    ('simple', 6.0, 28): [
        1.0, 0.99399143, 0.9874226, 0.98042077, 0.97315687, 0.96516633, 0.95659226, 0.94736844, 0.9377049,
        0.92696255, 0.91530246, 0.90297025, 0.8891192, 0.87391305, 0.85714287, 0.83909774, 0.8184419, 0.7952782,
        0.7698925, 0.74022985, 0.7061728, 0.6666667, 0.6216867, 0.56675464, 0.5002916, 0.42077923, 0.31764704,
        0.18305084, 0.0
    ],
    ('normal', 3.0, 1): [1.0, 0.0],
    ('normal', 3.0, 4): [1.0, 0.85769236, 0.60215056, 0.008928572, 0.0],
    ('normal', 3.0, 20): [
        1.0, 0.9818746, 0.9623857, 0.9413733, 0.9186516, 0.8940031, 0.86717194, 0.8378547, 0.8056892, 0.7702391,
        0.7309743, 0.6872438, 0.6382401, 0.58294797, 0.52007407, 0.44794428, 0.36435223, 0.2663297, 0.14978723,
        0.008928572, 0.0
    ],
    ('normal', 3.0, 28): [
        1.0, 0.9873807, 0.97410774, 0.96012926, 0.9453874, 0.929818, 0.9133489, 0.89590025, 0.8773819, 0.85769236,
        0.83671665, 0.81432474, 0.7903684, 0.76467705, 0.7370559, 0.7072785, 0.6750824, 0.64016014, 0.60215056,
        0.560625, 0.5150721, 0.46487603, 0.40928882, 0.34739265, 0.27804878, 0.199827, 0.11090573, 0.008928572, 0.0
    ],
    ('normal', 1.0, 1): [1.0, 0.0],
    ('normal', 1.0, 4): [1.0, 0.667, 0.334, 0.001, 0.0],
    ('normal', 1.0, 20): [
        1.0, 0.947421, 0.8948421, 0.84226316, 0.7896842, 0.73710525, 0.6845263, 0.6319474, 0.5793684, 0.5267894,
        0.47421053, 0.4216316, 0.36905265, 0.3164737, 0.26389474, 0.2113158, 0.15873684, 0.1061579, 0.05357895,
        0.001, 0.0
    ],
    ('normal', 1.0, 28): [
        1.0, 0.963, 0.926, 0.889, 0.852, 0.815, 0.778, 0.741, 0.704, 0.667, 0.63, 0.593, 0.556, 0.519, 0.482, 0.445,
        0.408, 0.371, 0.334, 0.297, 0.26, 0.223, 0.186, 0.149, 0.112, 0.075, 0.038, 0.001, 0.0
    ],
    ('normal', 6.0, 1): [1.0, 0.0],
    ('normal', 6.0, 4): [1.0, 0.92371136, 0.75333333, 0.034782607, 0.0],
    ('normal', 6.0, 20): [
        1.0, 0.990883, 0.980895, 0.96990514, 0.9577546, 0.94424903, 0.92914903, 0.91215366, 0.89288294, 0.87084675,
        0.8454039, 0.8156981, 0.78056014, 0.7383499, 0.68669355, 0.6220204, 0.5387013, 0.4273141, 0.27080294,
        0.034782607, 0.0
    ],
    ('normal', 6.0, 28): [
        1.0, 0.99366975, 0.9869258, 0.9797261, 0.97202265, 0.96376103, 0.9548781, 0.94530094, 0.93494505,
        0.92371124, 0.91148335, 0.8981226, 0.8834646, 0.8673103, 0.8494186, 0.8294931, 0.8071661, 0.7819758,
        0.75333333, 0.72047716, 0.68240345, 0.6377623, 0.58469385, 0.5205634, 0.44150946, 0.341637, 0.21147542,
        0.034782607, 0.0
    ],
    ('sgm_uniform', 3.0, 1): [1.0, 0.0],
    ('sgm_uniform', 3.0, 4): [1.0, 0.90035903, 0.7511211, 0.50298506, 0.0],
    ('sgm_uniform', 3.0, 20): [
        1.0, 0.982812, 0.9644003, 0.9446292, 0.92334247, 0.9003591, 0.8754674, 0.8484197, 0.8189233, 0.78662974,
        0.7511211, 0.71189237, 0.6683267, 0.61966264, 0.56494963, 0.50298506, 0.43222508, 0.3506538, 0.25558865,
        0.14337938, 0.0
    ],
    ('sgm_uniform', 3.0, 28): [
        1.0, 0.98784226, 0.9750785, 0.96166235, 0.9475425, 0.9326619, 0.91695756, 0.9003591, 0.8827878, 0.86415553,
        0.8443635, 0.82329965, 0.80083734, 0.77683264, 0.7511211, 0.7235138, 0.69379306, 0.66170675, 0.62696046,
        0.5892092, 0.54804564, 0.50298506, 0.45344672, 0.3987282, 0.3379722, 0.270121, 0.19385473, 0.10750446, 0.0
    ],
    ('sgm_uniform', 1.0, 1): [1.0, 0.0],
    ('sgm_uniform', 1.0, 4): [1.0, 0.75025, 0.5005, 0.25075, 0.0],
    ('sgm_uniform', 1.0, 20): [
        1.0, 0.95005, 0.9001, 0.85015005, 0.8002, 0.75025, 0.7003, 0.65035, 0.60040003, 0.55045, 0.5005, 0.45055002,
        0.40060002, 0.35064998, 0.3007, 0.25075, 0.2008, 0.15085001, 0.1009, 0.050950002, 0.0
    ],
    ('sgm_uniform', 1.0, 28): [
        1.0, 0.96432143, 0.92864287, 0.8929643, 0.8572857, 0.8216072, 0.7859286, 0.75025, 0.7145714, 0.6788929,
        0.6432143, 0.6075357, 0.57185715, 0.5361786, 0.50049996, 0.4648214, 0.42914283, 0.39346427, 0.3577857,
        0.3221071, 0.28642857, 0.25074998, 0.21507141, 0.17939286, 0.14371428, 0.108035706, 0.07235714, 0.03667857,
        0.0
    ],
    ('sgm_uniform', 6.0, 1): [1.0, 0.0],
    ('sgm_uniform', 6.0, 4): [1.0, 0.9477648, 0.85859877, 0.67192125, 0.0],
    ('sgm_uniform', 6.0, 20): [
        1.0, 0.9913586, 0.9819366, 0.9716234, 0.96028626, 0.9477648, 0.9338629, 0.9183395, 0.9008928, 0.88114214,
        0.85859877, 0.8326251, 0.8023739, 0.76669353, 0.7239787, 0.67192125, 0.6070797, 0.52408576, 0.41407618,
        0.26129597, 0.0
    ],
    ('sgm_uniform', 6.0, 28): [
        1.0, 0.9939028, 0.98742205, 0.98052067, 0.9731559, 0.96527994, 0.9568373, 0.9477648, 0.9379888, 0.92742455,
        0.9159727, 0.9035165, 0.8899174, 0.87501085, 0.85859877, 0.8404408, 0.82024294, 0.7976407, 0.77217793,
        0.7432745, 0.7101827, 0.67192113, 0.6271756, 0.5741451, 0.5102941, 0.4319345, 0.3334873, 0.2060927, 0.0
    ],
    ('beta', 3.0, 1): [1.0, 0.0],
    ('beta', 3.0, 4): [1.0, 0.9335348, 0.7507493, 0.39217135, 0.0],
    ('beta', 3.0, 20): [
        1.0, 0.9956288, 0.9863013, 0.9729445, 0.9553377, 0.9335348, 0.9075829, 0.8770764, 0.84094906, 0.7990655,
        0.7507493, 0.6944146, 0.63093853, 0.5589711, 0.47959182, 0.39217135, 0.2980769, 0.20242214, 0.11367837,
        0.040856034, 0.0
    ],
    ('beta', 3.0, 28): [
        1.0, 0.99765563, 0.99221396, 0.98489016, 0.9751575, 0.96351933, 0.9497433, 0.9335348, 0.9154326, 0.8951613,
        0.8718593, 0.84612024, 0.8175614, 0.7857144, 0.7507493, 0.7113565, 0.66851443, 0.6217799, 0.5706319,
        0.51445466, 0.45543176, 0.39217135, 0.3244514, 0.2562189, 0.18881117, 0.123853214, 0.06870229, 0.023622047,
        0.0
    ],
    ('beta', 1.0, 1): [1.0, 0.0],
    ('beta', 1.0, 4): [1.0, 0.824, 0.501, 0.177, 0.0],
    ('beta', 1.0, 20): [
        1.0, 0.987, 0.96, 0.923, 0.877, 0.824, 0.766, 0.704, 0.638, 0.57, 0.501, 0.431, 0.363, 0.297, 0.235, 0.177,
        0.124, 0.078, 0.041, 0.014, 0.0
    ],
    ('beta', 1.0, 28): [
        1.0, 0.993, 0.977, 0.956, 0.929, 0.898, 0.863, 0.824, 0.783, 0.74, 0.694, 0.647, 0.599, 0.55, 0.501, 0.451,
        0.402, 0.354, 0.307, 0.261, 0.218, 0.177, 0.138, 0.103, 0.072, 0.045, 0.024, 0.008, 0.0
    ],
    ('beta', 6.0, 1): [1.0, 0.0],
    ('beta', 6.0, 4): [1.0, 0.96562505, 0.857632, 0.56339526, 0.0],
    ('beta', 6.0, 20): [
        1.0, 0.9978096, 0.99310344, 0.9862868, 0.97715884, 0.96562505, 0.95155275, 0.9345133, 0.91360384,
        0.88831174, 0.857632, 0.81965137, 0.7737122, 0.71710265, 0.64827585, 0.56339526, 0.45925924, 0.33669063,
        0.20414938, 0.078504674, 0.0
    ],
    ('beta', 6.0, 28): [
        1.0, 0.9988265, 0.9960917, 0.9923876, 0.9874226, 0.9814208, 0.97422385, 0.96562505, 0.9558494, 0.9446809,
        0.9315436, 0.91664696, 0.8996245, 0.88000005, 0.857632, 0.8313364, 0.80132896, 0.76678705, 0.7266272,
        0.6793926, 0.6258373, 0.56339526, 0.4899408, 0.4079208, 0.31764704, 0.22040817, 0.12857142, 0.046153847, 0.0
    ],
    ('simple', 0.005, 4): [1.000001, 0.014778327, 0.0049751243, 0.0016638935, 0.0],
    ('normal', 0.005, 4): [1.0001926, 0.014778476, 0.0049751834, 0.0016639289, 2.5025027e-08],
    ('sgm_uniform', 0.005, 4): [1.0001926, 0.014778476, 0.0049751834, 0.0016639289, 0.0],
    ('beta', 0.005, 4): [1.000001, 0.02287364, 0.004994965, 0.0010741791, 0.0],
}

DENOISE_0_6 = {
    ('simple', 3.0, 4): [0.8573264, 0.75, 0.6007194, 0.37556222, 0.0],
    ('simple', 3.0, 20): [
        0.8224932, 0.802974, 0.78298277, 0.76181096, 0.7385787, 0.71465963, 0.68918926, 0.6610738, 0.6319445,
        0.6007194, 0.5671641, 0.5297542, 0.49057868, 0.4481066, 0.40029326, 0.3496932, 0.29421222, 0.23096447,
        0.1631016, 0.087570615, 0.0
    ],
    ('simple', 6.0, 4): [0.9231833, 0.85714287, 0.7505618, 0.546049, 0.0],
    ('simple', 6.0, 20): [
        0.90260226, 0.8907216, 0.87828416, 0.8648044, 0.849635, 0.83358777, 0.81600004, 0.79595953, 0.7744681,
        0.7505618, 0.7238095, 0.6926004, 0.6582392, 0.6188862, 0.57172775, 0.5181818, 0.4546584, 0.37525776,
        0.28045976, 0.16103895, 0.0
    ],
    ('normal', 3.0, 4): [0.8189233, 0.6683267, 0.43222508, 0.008928572, 0.0],
    ('normal', 3.0, 20): [
        0.8150474, 0.7949868, 0.7737157, 0.7511211, 0.72707546, 0.7014345, 0.674034, 0.64468634, 0.6131762,
        0.5792557, 0.542637, 0.50298506, 0.45990658, 0.4129373, 0.36152536, 0.30500895, 0.24258824, 0.17328699,
        0.095901206, 0.008928572, 0.0
    ],
    ('normal', 6.0, 4): [0.9008928, 0.8023739, 0.6070797, 0.034782607, 0.0],
    ('normal', 6.0, 20): [
        0.89855886, 0.8863205, 0.8730461, 0.85859877, 0.84281546, 0.82550216, 0.806425, 0.7852998, 0.76177824,
        0.7354279, 0.70570606, 0.67192125, 0.6331791, 0.58830243, 0.5357087, 0.47322032, 0.39775494, 0.30480167,
        0.18748523, 0.034782607, 0.0
    ],
    ('sgm_uniform', 3.0, 4): [0.85769236, 0.7511211, 0.60215056, 0.37919462, 0.0],
    ('sgm_uniform', 3.0, 20): [
        0.8226401, 0.8036391, 0.78354144, 0.76224893, 0.73965234, 0.7156277, 0.6900352, 0.6627165, 0.63349056,
        0.60215056, 0.56845844, 0.5321392, 0.49287283, 0.45028567, 0.40393797, 0.35330835, 0.29777488, 0.23658873,
        0.16884057, 0.093415, 0.0
    ],
    ('sgm_uniform', 6.0, 4): [0.92371136, 0.85859877, 0.75333333, 0.55421686, 0.0],
    ('sgm_uniform', 6.0, 20): [
        0.9031218, 0.8916318, 0.8792166, 0.8657596, 0.8511243, 0.8351486, 0.8176394, 0.7983651, 0.7770444,
        0.75333333, 0.72680575, 0.69692826, 0.66302365, 0.62421876, 0.5793684, 0.52694064, 0.4648379, 0.3901099,
        0.2984709, 0.18344828, 0.0
    ],
    ('beta', 3.0, 4): [0.88775516, 0.7507493, 0.5335051, 0.2331081, 0.0],
    ('beta', 3.0, 20): [
        0.84554976, 0.821267, 0.79444975, 0.7654261, 0.7346938, 0.70042646, 0.6629464, 0.62280697, 0.5797546,
        0.5335051, 0.4837398, 0.43162394, 0.37724552, 0.3207547, 0.26237622, 0.20466323, 0.14864863, 0.09813084,
        0.05212355, 0.01778656, 0.0
    ],
    ('beta', 6.0, 4): [0.9405406, 0.857632, 0.6957982, 0.3780822, 0.0],
    ('beta', 6.0, 20): [
        0.9163121, 0.90186334, 0.8854522, 0.867129, 0.84705883, 0.82382447, 0.7973154, 0.7675675, 0.73398054,
        0.6957982, 0.6520548, 0.6029851, 0.5478261, 0.4857143, 0.41568628, 0.33978498, 0.2588235, 0.17872342,
        0.09908256, 0.034951456, 0.0
    ],
}

SAMPLER_RUNS = {
    ('euler', 'simple', 4, 3.0): [
        -0.034169693, 0.1610621, -0.35521302, 0.031887863, 0.3004277, -0.12815769, 0.7803213, -0.7672236,
        -0.023038195, -0.13678426, 0.11098074, -0.09935771, 0.41757986, 0.09120177, 0.25847647, 0.18657936
    ],
    ('euler', 'beta', 20, 3.0): [
        -0.019377045, 0.09121422, -0.20014699, 0.018083207, 0.16957794, -0.07261628, 0.4312264, -0.42427677,
        -0.013065014, -0.077494755, 0.06289739, -0.05631754, 0.23474936, 0.05169896, 0.14607158, 0.10561588
    ],
    ('euler', 'normal', 28, 6.0): [
        -0.020897292, 0.09837807, -0.21593213, 0.01950194, 0.18293242, -0.078317195, 0.46586758, -0.4583352,
        -0.014090018, -0.08357925, 0.067834444, -0.06073764, 0.2532999, 0.0557563, 0.15756364, 0.113913946
    ],
    ('euler', 'sgm_uniform', 28, 1.0): [
        -0.017638301, 0.08301743, -0.18205918, 0.01646058, 0.15428306, -0.06609439, 0.3913588, -0.38508433,
        -0.01189271, -0.0705338, 0.05724976, -0.05126145, 0.21347956, 0.047057923, 0.13291425, 0.096120015
    ],
    ('dpmpp_2m', 'simple', 4, 3.0): [
        -0.03390007, 0.15969825, -0.35144034, 0.03163636, 0.29745907, -0.12710059, 0.76628447, -0.75360227,
        -0.022856751, -0.13564873, 0.110075936, -0.09855333, 0.41275185, 0.09046676, 0.256052, 0.18496169
    ],
    ('dpmpp_2m', 'beta', 20, 3.0): [
        -0.016798256, 0.07903533, -0.17308787, 0.015676657, 0.14675105, -0.06293263, 0.37007603, -0.36421293,
        -0.011326408, -0.06715745, 0.054514334, -0.04881386, 0.20283332, 0.04481208, 0.12646596, 0.0914978
    ],
    ('dpmpp_2m', 'normal', 28, 6.0): [
        -0.016318575, 0.07673642, -0.1676984, 0.015229048, 0.14228679, -0.061114915, 0.35555574, -0.35002926,
        -0.011003138, -0.065214425, 0.05294454, -0.047410794, 0.19632831, 0.043525536, 0.122679345, 0.08881928
    ],
    ('dpmpp_2m', 'sgm_uniform', 28, 1.0): [
        -0.016237864, 0.07641232, -0.16745837, 0.015153671, 0.1419441, -0.06083991, 0.35899472, -0.35327357,
        -0.010948511, -0.06492531, 0.052700013, -0.047188424, 0.1962973, 0.043319385, 0.1223039, 0.08846683
    ],
}

KSAMPLER_RUNS = {
    ('euler', 'simple', 6, 1.0, None, 3.0, 'latent'): (
        [
            0.6392801, 0.49169797, 0.312678, -0.5813287, 0.24879715, -0.29058865, 0.049116693, -0.4080372,
            -0.1479947, 0.5443809, -0.0469211, -0.34323138, -0.1410673, -0.093437925, -0.15277678, 0.27274528,
            0.5422582, 0.017206281, -0.07608497, 0.18178968, -0.14971016, 0.36508396, 0.28375348, 0.55499125,
            0.42611635, 0.43147212, 0.22958523, 0.44339365, -0.0025607608, 0.07232541, -0.008044761, 0.300805
        ],
        [
            0.3533123, 3.61238, -0.1691303, 0.8360362, 1.8906002, 0.69022626, 1.7254698, 1.782558, 2.1108656,
            1.4004153, 0.88660693, -1.0498672, 2.9420903, 0.40250146, 0.7730762, 1.8885353
        ],
    ),
    ('dpmpp_2m', 'beta', 10, 0.6, None, 3.0, 'latent'): (
        [
            0.41182923, 0.2987282, 0.14350986, -0.3118905, 0.22111402, -0.12740697, 0.05227967, -0.22126508,
            -0.03581876, 0.30711636, -0.03423762, -0.16749005, -0.014760572, -0.031330574, -0.06708324, 0.1505044,
            0.39580727, 0.074637264, -0.019811202, 0.09808174, -0.05202962, 0.2024881, 0.18347694, 0.30800882,
            0.23752752, 0.27726406, 0.14946395, 0.1981002, 0.07176318, 0.0827145, 0.033059724, 0.24022725
        ],
        [
            0.5737984, 2.4807796, 0.2808733, 1.0985521, 1.5121005, 0.94112086, 1.4143324, 1.3691062, 1.7509444,
            1.153635, 1.0026501, -0.099520385, 1.923049, 0.7625561, 0.9883766, 1.5407794
        ],
    ),
    ('dpmpp_2m', 'normal', 10, 0.6, 'soft', 6.0, 'latent'): (
        [
            1.5211171, 0.47672856, -1.0312827, -0.9180121, 1.6080147, -0.0987193, 0.009641591, -0.680933,
            0.37436244, 0.09384219, -0.6903174, -0.27887708, 0.7749005, -0.17551187, -0.2292299, -0.087613896,
            2.2435336, 0.9768872, -0.13303638, -0.45310715, -0.0017354824, -0.31539008, 0.19052094, 0.05439616,
            -0.21334967, 0.61820036, 0.06632916, -0.6895811, 1.1221164, 0.39815116, 0.20334378, 0.62465173
        ],
        [
            0.6681101, 4.6919312, 0.65043736, 4.9584093, 1.9895838, 2.7136583, 1.441169, 0.51081, 4.454698,
            -0.1288611, 2.1168706, 0.10890731, 0.3913237, 3.0371723, 3.714334, 2.13161
        ],
    ),
    ('euler', 'sgm_uniform', 8, 1.0, 'hard', 3.0, 'empty'): (
        [
            0.0609, 0.0609, 0.30032387, -0.54603386, 0.06090001, -0.2728745, 0.049676023, -0.3835533, 0.0609,
            0.0609, -0.04176988, 0.0609, -0.1312675, 0.0609, 0.0609, 0.0609, 0.0609, 0.0609, -0.069514796,
            0.17600462, 0.0609, 0.34995595, 0.27289185, 0.52899456, 0.0609, 0.060900018, 0.2214526, 0.0609,
            0.00045827404, 0.0609, 0.0609, 0.0609
        ],
        [
            -0.4773991, 2.0283432, 0.58071977, 1.0020039, 1.9357455, 0.15168163, 1.6857092, 1.330746, 0.44924238,
            0.7385112, 0.3724921, -0.44948018, 1.6422584, -0.33422446, 0.8416635, 1.6244376
        ],
    ),
    ('dpmpp_2m', 'simple', 12, 0.75, 'hard', 1.0, 'latent'): (
        [
            1.573864, 0.5151097, 0.09194638, -0.3493491, 1.7155356, -0.1267011, 0.050207995, -0.25326398,
            0.41261458, 0.08482579, -0.06921388, -0.48465428, 0.018264513, -0.23552635, -0.3679167, -0.52586806,
            2.3238904, 1.0776203, -0.025300559, 0.07008092, -0.003730137, 0.18077423, 0.18465109, 0.29474118,
            -0.24991873, 0.72338706, 0.14594956, -1.5243961, 0.115989685, 0.4952305, 0.29937503, 1.4976252
        ],
        [
            2.0498753, 5.60597, -0.84621686, 4.417578, 3.0764124, 2.1635392, 0.6804898, 1.8575186, 5.3110065,
            -2.966443, 0.6233965, 0.21262066, 1.3096294, -1.3223199, 0.71702766, 1.6426153
        ],
    ),
    ('euler', 'normal', 5, 1.0, None, 0.005, 'latent'): (
        [
            0.35648522, 0.2755411, 0.18203744, -0.2702378, 0.15018892, -0.11149132, 0.055388786, -0.17440207,
            -0.038801383, 0.30420396, 0.010205705, -0.13940018, -0.03540278, -0.012119647, -0.041134458, 0.16207029,
            0.30292332, 0.040398095, -0.0037631728, 0.117892824, -0.039632093, 0.20870095, 0.16749938, 0.3100218,
            0.24054606, 0.24333042, 0.14088446, 0.24976237, 0.031101227, 0.0662298, 0.028556291, 0.1759546
        ],
        [
            0.6731317, 2.2804062, 0.44199148, 0.9242432, 1.421523, 0.8240617, 1.302115, 1.3518765, 1.5292106,
            1.1716571, 0.92254674, -0.03325036, 1.9623466, 0.6812645, 0.88151276, 1.4199603
        ],
    ),
}

SAMPLER_X = [
    -0.076644294, 0.35988152, -0.7820168, 0.071527734, 0.6648394, -0.2867803, 1.6205508, -1.596708,
    -0.051680963, -0.3059757, 0.24850175, -0.22256084, 0.9131519, 0.20434111, 0.5739847, 0.4163313
]


def toy_denoiser(x, sigma):
    # ComfyUI hands the denoiser an fp32 sigma tensor (one per batch item); the same here keeps the arithmetic equal.
    if isinstance(sigma, torch.Tensor):
        s = sigma.reshape([sigma.shape[0]] + [1] * (x.ndim - 1)) if sigma.ndim else sigma
    else:
        s = torch.tensor(sigma, dtype=torch.float32)
    return 0.7 * x - 0.2 * s * torch.sin(x)


class ToySD3:
    """A model adapter whose denoiser is the toy, with SD3's latent format; shift fixed per case."""

    latent_format = SD3_FORMAT

    def __init__(self, shift):
        self.shift = shift

    def check_latent(self, shape):
        pass

    def model_sampling(self, shape):
        return DiscreteFlowModelSampling(self.shift)

    def denoiser(self, cond, shape):
        return toy_denoiser


def _latent(kind="latent"):
    if kind == "empty":
        return torch.zeros(1, 16, 4, 4)
    return torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1


def _mask(name):
    if name == "soft":  # pixel resolution, resized by ComfyUI's bilinear reshape_mask
        yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
        return ((xx + 0.5 * yy) / 1.5).reshape(1, 1, 32, 32)
    if name == "hard":  # latent resolution, plain [H, W]
        return torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    return None


def _f32(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("shift", list(TABLES))
def test_model_sampling_equals_comfyui(shift):
    first, last, percents, timesteps, sigmas = TABLES[shift]
    s = DiscreteFlowModelSampling(shift)
    assert s.sigmas.dtype == torch.float32 and len(s.sigmas) == 1000
    assert torch.equal(s.sigmas[:5], _f32(first)) and torch.equal(s.sigmas[-5:], _f32(last))
    assert torch.equal(s.sigma_min, _f32(first[0])) and torch.equal(s.sigma_max, _f32(last[-1]))
    assert [s.percent_to_sigma(p) for p in PERCENTS] == percents
    assert torch.equal(s.timestep(_f32(SIGMAS_IN)), _f32(timesteps))
    assert torch.equal(s.sigma(_f32(TIMESTEPS_IN)), _f32(sigmas))


def test_default_shift_is_identity_and_sd3_shift_is_3():
    assert torch.equal(DiscreteFlowModelSampling().sigmas, DiscreteFlowModelSampling(1.0).sigmas)
    assert DiscreteFlowModelSampling(SD3_SHIFT).percent_to_sigma(0.5) == TABLES[3.0][2][3] == 0.75


@pytest.mark.parametrize("key", list(SCHEDULES), ids=lambda k: f"{k[0]}-shift{k[1]}-{k[2]}steps")
def test_schedules_equal_comfyui_bit_for_bit(key):
    scheduler, shift, steps = key
    assert torch.equal(make_sigmas(scheduler, steps, DiscreteFlowModelSampling(shift)), _f32(SCHEDULES[key]))


def test_tiny_shift_takes_the_normal_schedulers_no_zero_branch():
    sigmas = make_sigmas("normal", 4, DiscreteFlowModelSampling(0.005))
    assert len(sigmas) == 5 and 0 < float(sigmas[-1]) < 1e-5  # 4 steps, the last one to a sigma near 0, no 0
    assert 0 < float(make_sigmas("normal", 4, DiscreteFlowModelSampling(0.09))[-1]) < 1e-5
    for shift in (SD3_SHIFT, 1.0, 6.0, 0.11):
        assert float(make_sigmas("normal", 4, DiscreteFlowModelSampling(shift))[-1]) == 0.0


@pytest.mark.parametrize("key", list(DENOISE_0_6), ids=lambda k: f"{k[0]}-shift{k[1]}-{k[2]}steps")
def test_denoise_0_6_sigmas_equal_comfyui(key):
    scheduler, shift, steps = key
    assert torch.equal(ksampler_sigmas(scheduler, steps, DiscreteFlowModelSampling(shift), 0.6), _f32(DENOISE_0_6[key]))


@pytest.mark.parametrize("key", list(SAMPLER_RUNS), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}steps-shift{k[3]}")
def test_sampler_trajectories_match_comfyui(key):
    name, scheduler, steps, shift = key
    x = _f32(SAMPLER_X).reshape(1, 4, 2, 2)
    got = get_sampler(name)(toy_denoiser, x, make_sigmas(scheduler, steps, DiscreteFlowModelSampling(shift)))
    torch.testing.assert_close(got.flatten(), _f32(SAMPLER_RUNS[key]), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("key", list(KSAMPLER_RUNS), ids=lambda k: "-".join(map(str, k)))
def test_ksampler_path_matches_comfyui(key):
    sampler_name, scheduler, steps, denoise, mask_name, shift, latent_name = key
    out = sample(ToySD3(shift), {}, _latent(latent_name), 42, steps, sampler_name=sampler_name, scheduler=scheduler,
                 denoise=denoise, noise_mask=_mask(mask_name))
    first_channels, channel_sums = KSAMPLER_RUNS[key]
    torch.testing.assert_close(out[0, :2].flatten(), _f32(first_channels), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out[0].sum(dim=(1, 2)), _f32(channel_sums), rtol=2e-6, atol=4e-6)


# Live comparison with ComfyUI's own functions, where its source and its imports are at hand.

REPO_ROOT = Path(__file__).resolve().parents[2]
_STAND_INS = ("comfy", "folder_paths", "node_helpers")  # names other tests may fill with fakes


def _comfyui_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or REPO_ROOT.parent / "shared" / "comfyui")


def _from_dir(module, root: Path) -> bool:
    paths = [getattr(module, "__file__", None)]
    try:
        paths += list(getattr(module, "__path__", None) or [])
    except TypeError:  # a module whose __path__ is no list of folders
        pass
    return any(isinstance(p, str) and Path(p).resolve().is_relative_to(root) for p in paths)


@pytest.fixture(scope="module")
def comfyui():
    """ComfyUI's modules imported from its source, then taken out of sys.modules (and sys.path) again afterwards.

    Holds model_sampling when comfy.model_sampling imports, the rest when comfy.samplers does too (its model
    management on the CPU); `missing` says why a part did not import."""
    root = _comfyui_dir().resolve()
    if not (root / "comfy" / "model_sampling.py").is_file():
        pytest.skip(f"no ComfyUI source at {root} (set COMFYUI_DIR)")
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in _STAND_INS}
    for name in saved:
        del sys.modules[name]
    before = set(sys.modules)
    sys.path.append(str(root))
    found = types.SimpleNamespace(missing={})
    try:
        try:
            found.model_sampling = importlib.import_module("comfy.model_sampling")
        except Exception as e:  # noqa: BLE001 - any failure to import means: nothing to compare with here
            found.missing["model_sampling"] = f"{type(e).__name__}: {e}"
        else:
            try:
                importlib.import_module("comfy.cli_args").args.cpu = True  # before model_management picks a device
                for name in ("samplers", "sample", "sampler_helpers", "latent_formats", "model_base"):
                    setattr(found, name, importlib.import_module(f"comfy.{name}"))
                found.kd = importlib.import_module("comfy.k_diffusion.sampling")
            except Exception as e:  # noqa: BLE001
                found.missing["samplers"] = f"{type(e).__name__}: {e}"
        yield found
    finally:
        for name in [n for n, m in list(sys.modules.items()) if n not in before and _from_dir(m, root)]:
            del sys.modules[name]
        sys.modules.update(saved)
        sys.path.remove(str(root))


def _need(comfyui, part):
    if part in comfyui.missing or "model_sampling" in comfyui.missing:
        reason = comfyui.missing.get("model_sampling") or comfyui.missing[part]
        pytest.skip(f"ComfyUI's comfy.{part} does not import in this environment ({reason})")


def _comfy_discrete_flow(c, shift, multiplier=1000):
    """ComfyUI's model sampling as its ModelSamplingSD3 (multiplier 1000) or ModelSamplingAuraFlow (1) node sets it."""
    class ModelSamplingAdvanced(c.model_sampling.ModelSamplingDiscreteFlow, c.model_sampling.CONST):
        pass

    s = ModelSamplingAdvanced()
    s.set_parameters(shift=shift, multiplier=multiplier)
    return s


def _comfy_flux(c, shift):
    class ModelSamplingAdvanced(c.model_sampling.ModelSamplingFlux, c.model_sampling.CONST):
        pass

    s = ModelSamplingAdvanced()
    s.set_parameters(shift=shift)
    return s


LIVE_SHIFTS = (3.0, 1.0, 6.0, 0.005, 2.37, 100.0)


def test_live_model_sampling_equals_comfyui(comfyui):
    _need(comfyui, "model_sampling")
    g = torch.Generator().manual_seed(3)
    sig, ts = torch.rand(64, generator=g), torch.rand(64, generator=g) * 1000
    x, v, n = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    cases = [(_comfy_discrete_flow(comfyui, sh), DiscreteFlowModelSampling(sh)) for sh in LIVE_SHIFTS]
    cases += [(_comfy_discrete_flow(comfyui, 1.73, 1.0), DiscreteFlowModelSampling(1.73, 1.0))]
    cases += [(_comfy_flux(comfyui, mu), FluxModelSampling(mu)) for mu in (0.5, 1.0, 1.15)]
    for theirs, ours in cases:
        assert torch.equal(ours.sigmas, theirs.sigmas), ours
        assert torch.equal(ours.sigma_min, theirs.sigma_min) and torch.equal(ours.sigma_max, theirs.sigma_max)
        assert torch.equal(ours.timestep(sig), theirs.timestep(sig)) and torch.equal(ours.sigma(ts), theirs.sigma(ts))
        for p in (0.0, 0.05, 0.1, 0.333, 0.5, 0.7, 0.999, 1.0):
            assert ours.percent_to_sigma(p) == theirs.percent_to_sigma(p), (ours, p)
        for s in (ours.sigmas[517], torch.tensor([0.25, 0.8]), float(ours.sigmas[3])):
            s_theirs = s if isinstance(s, torch.Tensor) else torch.tensor([s])
            assert torch.equal(ours.calculate_denoised(s, v, x), theirs.calculate_denoised(s_theirs, v, x))
            assert torch.equal(ours.noise_scaling(s, n, x), theirs.noise_scaling(s_theirs, n, x))
            assert torch.equal(ours.inverse_noise_scaling(s, x), theirs.inverse_noise_scaling(s_theirs, x))


class _Patcher:
    """What KSampler reads of a ModelPatcher to set its sigmas."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.model_sampling


def test_live_schedules_equal_comfyui(comfyui):
    _need(comfyui, "samplers")
    samplers = comfyui.samplers
    for shift in LIVE_SHIFTS:
        theirs, ours = _comfy_discrete_flow(comfyui, shift), DiscreteFlowModelSampling(shift)
        for scheduler in SCHEDULERS:
            for steps in (1, 2, 3, 4, 7, 20, 28, 50):
                assert torch.equal(make_sigmas(scheduler, steps, ours),
                                   samplers.calculate_sigmas(theirs, scheduler, steps)), (scheduler, shift, steps)
            for steps in (4, 20):
                for denoise in (0.0, 0.35, 0.6, 0.8, 1.0):
                    expected = samplers.KSampler(_Patcher(theirs), steps, "cpu", "euler", scheduler, denoise).sigmas
                    got = ksampler_sigmas(scheduler, steps, ours, denoise)
                    assert torch.equal(got, expected), (scheduler, shift, steps, denoise)


def test_live_sampler_trajectories_equal_comfyui(comfyui):
    _need(comfyui, "samplers")
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    theirs_fns = {"euler": comfyui.kd.sample_euler, "dpmpp_2m": comfyui.kd.sample_dpmpp_2m}
    for name, fn in theirs_fns.items():
        for scheduler in SCHEDULERS:
            for steps, shift in ((4, 3.0), (13, 1.0), (28, 6.0)):
                sigmas = comfyui.samplers.calculate_sigmas(_comfy_discrete_flow(comfyui, shift), scheduler, steps)
                expected = fn(lambda x, s, **kw: toy_denoiser(x, s), x.clone(), sigmas, disable=True)
                ours = make_sigmas(scheduler, steps, DiscreteFlowModelSampling(shift))
                got = get_sampler(name)(toy_denoiser, x, ours)
                assert torch.equal(got, expected), (name, scheduler, steps, shift)


def _comfy_ksampler(c, shift, sampler_name, scheduler, steps, denoise, mask, latent, seed):
    """ComfyUI's KSampler path around a model that is the toy denoiser (CFGGuider.outer_sample/inner_sample's steps)."""
    model_sampling = _comfy_discrete_flow(c, shift)
    inner = types.SimpleNamespace(model_sampling=model_sampling)
    inner.scale_latent_inpaint = lambda **kw: c.model_base.BaseModel.scale_latent_inpaint(inner, **kw)

    class Wrap:
        inner_model = inner

        def __call__(self, x, sigma, model_options={}, seed=None):
            return toy_denoiser(x, sigma)

    fmt = c.latent_formats.SD3()
    noise = c.sample.prepare_noise(latent, seed)
    sigmas = c.samplers.KSampler(_Patcher(model_sampling), steps, "cpu", sampler_name, scheduler, denoise).sigmas
    denoise_mask = c.sampler_helpers.prepare_mask(mask, noise.shape, "cpu") if mask is not None else None
    latent_in = fmt.process_in(latent) if torch.count_nonzero(latent) > 0 else latent
    out = c.samplers.ksampler(sampler_name).sample(Wrap(), sigmas, {"model_options": {}, "seed": seed}, None, noise,
                                                   latent_in, denoise_mask, True)
    return fmt.process_out(out.to(torch.float32))


def test_live_ksampler_path_equals_comfyui(comfyui):
    _need(comfyui, "samplers")
    batch = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(6))
    cases = [*KSAMPLER_RUNS, ("dpmpp_2m", "sgm_uniform", 9, 0.5, "soft", 3.0, "batch"),
             ("euler", "beta", 7, 0.8, "hard", 2.37, "batch")]
    for sampler_name, scheduler, steps, denoise, mask_name, shift, latent_name in cases:
        latent = batch if latent_name == "batch" else _latent(latent_name)
        expected = _comfy_ksampler(comfyui, shift, sampler_name, scheduler, steps, denoise, _mask(mask_name), latent,
                                   42)
        got = sample(ToySD3(shift), {}, latent, 42, steps, sampler_name=sampler_name, scheduler=scheduler,
                     denoise=denoise, noise_mask=_mask(mask_name))
        assert torch.equal(got, expected), (sampler_name, scheduler, steps, denoise, mask_name, shift, latent_name)
