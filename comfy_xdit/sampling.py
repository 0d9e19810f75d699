"""Flow-matching sampling on plain tensors, following ComfyUI's conventions.

Model-family-agnostic: a model adapter supplies its model sampling (the sigma table and the
sigma <-> timestep maps, ComfyUI's comfy/model_sampling.py) and a denoiser over a conditioning
dict; the schedulers, samplers, noise, masks and parallel splits here never look inside either.

Every rank runs this loop in lockstep on identical inputs: noise comes from the seed on
the CPU (as ComfyUI's KSampler draws it), so no broadcast of the starting latent is needed.
Under a mesh, the "dp" axis splits the batch and the "cfg" axis splits the two CFG branches;
the model itself handles the sequence axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

SIGMA_TABLE_SIZE = 10000  # ComfyUI's ModelSamplingFlux timesteps
DISCRETE_FLOW_TIMESTEPS = 1000  # ComfyUI's ModelSamplingDiscreteFlow timesteps


@dataclass(frozen=True)
class LatentFormat:
    """VAE latent <-> model space: model = (latent - shift) * scale, or with per-channel statistics (Wan's VAEs,
    ComfyUI's latent_formats.Wan21 / Wan22) model = (latent - mean[c]) * scale / std[c].

    dims: the latent's spatial dimensions after [B, C]: 2 for images [B, C, h, w], 3 for video [B, C, t, h, w]."""

    channels: int
    scale: float
    shift: float = 0.0
    mean: tuple | None = None
    std: tuple | None = None
    dims: int = 2

    def _stats(self, x: torch.Tensor):
        view = (1, self.channels) + (1,) * (x.dim() - 2)
        return (torch.tensor(self.mean).view(view).to(x.device, x.dtype),
                torch.tensor(self.std).view(view).to(x.device, x.dtype))

    def to_model(self, latent: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean, std = self._stats(latent)
            return (latent - mean) * self.scale / std
        return (latent - self.shift) * self.scale

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean, std = self._stats(x)
            return x * std / self.scale + mean
        return x / self.scale + self.shift


def resolution_shift(image_tokens: float, base_shift: float = 0.5, max_shift: float = 1.15,
                  base_tokens: int = 256, max_tokens: int = 4096) -> float:
    """Resolution-dependent time shift, linear in image tokens: what ComfyUI's ModelSamplingFlux node sets from
    its width and height (image_tokens = width * height / 256), with the node's operations in its order, so the
    value is the same float."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    intercept = base_shift - slope * base_tokens
    return image_tokens * slope + intercept


def flux_time_shift(mu: float, t):
    """ComfyUI's flux_time_shift(mu, 1.0, t), written with the same operations so fp32 tensors match bit for bit."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def time_snr_shift(alpha: float, t):
    """ComfyUI's time_snr_shift (SD3's timestep shift), with the same operations so fp32 tensors match bit for bit."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def _reshape_sigma(sigma, ndim: int):
    """ComfyUI's reshape_sigma for a tensor sigma (one value, or one per batch item); a number stays as it is."""
    if not isinstance(sigma, torch.Tensor):
        return sigma
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class ConstPrediction:
    """ComfyUI's CONST prediction (flow matching): x_t = sigma * noise + (1 - sigma) * x0, the model predicts
    the velocity noise - x0. `sigma` may be a number, a one-value tensor or one value per batch item."""

    def calculate_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """What the model is given for x at sigma: x itself for flow models."""
        return x

    def calculate_denoised(self, sigma, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, model_output.ndim)
        return model_input - model_output * sigma

    def noise_scaling(self, sigma, noise: torch.Tensor, latent_image: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, latent.ndim)
        return latent / (1.0 - sigma)


class _TableSampling(ConstPrediction):
    """Shared by the model samplings below: an ascending fp32 table `sigmas` (sigma_min first)."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]


class FluxModelSampling(_TableSampling):
    """ComfyUI's ModelSamplingFlux at `shift` (Flux's mu): an fp32 table of 10000 sigmas, timestep(sigma) = sigma."""

    def __init__(self, shift: float):
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, SIGMA_TABLE_SIZE + 1, 1, dtype=torch.float32) / SIGMA_TABLE_SIZE)

    def __repr__(self) -> str:
        return f"FluxModelSampling(shift={self.shift})"

    def timestep(self, sigma):
        return sigma

    def input_sigma(self, timestep):
        """The sigma of a model call at ComfyUI's `timestep` (the inverse of timestep())."""
        return timestep

    def sigma(self, timestep):
        return flux_time_shift(self.shift, timestep)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return flux_time_shift(self.shift, 1.0 - percent)


class DiscreteFlowModelSampling(_TableSampling):
    """ComfyUI's ModelSamplingDiscreteFlow (SD3's, shift 3.0; its ModelSamplingSD3 node sets `shift`, multiplier
    1000): an fp32 table of 1000 sigmas, sigma(t) = time_snr_shift(shift, t / multiplier),
    timestep(sigma) = sigma * multiplier."""

    def __init__(self, shift: float = 1.0, multiplier: float = 1000):
        self.shift = shift
        self.multiplier = multiplier
        steps = DISCRETE_FLOW_TIMESTEPS
        # The same operations as ComfyUI's set_parameters (an int arange, then / and *), for the same fp32 table.
        self.sigmas = self.sigma((torch.arange(1, steps + 1, 1) / steps) * multiplier)

    def __repr__(self) -> str:
        return f"DiscreteFlowModelSampling(shift={self.shift}, multiplier={self.multiplier})"

    def timestep(self, sigma):
        return sigma * self.multiplier

    def input_sigma(self, timestep):
        """The sigma of a model call at ComfyUI's `timestep` (the inverse of timestep())."""
        return timestep / self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return time_snr_shift(self.shift, 1.0 - percent)


def beta_schedule(schedule: str, timesteps: int, linear_start: float, linear_end: float) -> torch.Tensor:
    """The betas of ComfyUI's make_beta_schedule in float64 ("linear": squares of a linear ramp of square roots,
    "sqrt_linear": a linear ramp, "sqrt": its square roots)."""
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    raise ValueError(f"beta schedule {schedule!r} unknown; choose linear, sqrt_linear or sqrt")


class DiscreteModelSampling:
    """ComfyUI's ModelSamplingDiscrete with EPS or V_PREDICTION (the DDPM-trained DiTs: PixArt eps, HunyuanDiT v):
    sigmas from a beta schedule, timestep(sigma) the nearest table index in log sigma, sigma(t) interpolated in
    log sigma; the model sees x / sqrt(sigma^2 + 1) and predicts the noise (eps) or v. sigma_data is 1."""

    def __init__(self, schedule: str = "linear", linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000, prediction: str = "eps"):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.schedule, self.prediction = schedule, prediction
        self.linear_start, self.linear_end = linear_start, linear_end
        alphas_cumprod = torch.cumprod(1.0 - beta_schedule(schedule, timesteps, linear_start, linear_end), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def __repr__(self) -> str:
        return (f"DiscreteModelSampling({self.schedule!r}, {self.linear_start}, {self.linear_end}, "
                f"prediction={self.prediction!r})")

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        timestep = torch.as_tensor(timestep)
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def input_sigma(self, timestep):
        """The sigma of a model call at ComfyUI's `timestep` (a table index, as timestep() gives it)."""
        return self.sigma(timestep)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    def calculate_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim)
        return x / (sigma ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        sigma = _reshape_sigma(sigma, model_output.ndim)
        if self.prediction == "eps":
            return model_input - model_output * sigma
        return model_input / (sigma ** 2 + 1.0) - model_output * sigma / (sigma ** 2 + 1.0) ** 0.5

    def noise_scaling(self, sigma, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """KSampler's start: noise * sqrt(1 + sigma^2) from pure noise (max_denoise), else noise * sigma, plus
        the latent."""
        sigma = _reshape_sigma(torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device), noise.ndim)
        scaled = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return scaled + latent_image

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        return latent


def max_denoise(model_sampling, sigmas: torch.Tensor) -> bool:
    """KSAMPLER.max_denoise: the run starts at (or above) the table's largest sigma."""
    top, first = float(model_sampling.sigma_max), float(sigmas[0])
    return math.isclose(top, first, rel_tol=1e-05) or first > top


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def simple_sigmas(steps: int, model_sampling) -> torch.Tensor:
    """ComfyUI's "simple" scheduler: evenly spaced picks from the end of the table, then 0."""
    _check_steps(steps)
    table = model_sampling.sigmas
    stride = len(table) / steps
    picks = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float32)


def normal_sigmas(steps: int, model_sampling, sgm: bool = False) -> torch.Tensor:
    """ComfyUI's "normal" scheduler (and "sgm_uniform" with sgm=True): uniform in timestep, mapped back to sigma."""
    _check_steps(steps)
    s = model_sampling
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        # sigma(timestep(sigma_min)) ~ 0: end there instead of on an appended 0. Never for Flux; for discrete
        # flow, where this shifts sigma_min a second time (~ shift^2 / 1000), at shifts below ~0.09995.
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = [float(s.sigma(t)) for t in timesteps]
    if append_zero:
        sigmas.append(0.0)
    return torch.tensor(sigmas, dtype=torch.float32)


def sgm_uniform_sigmas(steps: int, model_sampling) -> torch.Tensor:
    """ComfyUI's "sgm_uniform" scheduler: the normal scheduler's spacing over steps + 1, last point dropped."""
    return normal_sigmas(steps, model_sampling, sgm=True)


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((a - 1.0 + m2) * (a + m2)),
                   -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float, log_beta: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betainc_cf(a, b, x) / a
    return 1.0 - front * _betainc_cf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse CDF of the Beta(a, b) distribution (scipy.stats.beta.ppf) in float64, without scipy."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if a == b and p == 0.5:
        return 0.5  # exact median of a symmetric beta; 0.5 * 9999 sits on a rounding tie
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo, hi, x = 0.0, 1.0, p
    for _ in range(200):
        f = _betainc(a, b, x, log_beta) - p
        if f == 0.0:
            return x
        if f < 0.0:
            lo = x
        else:
            hi = x
        # Newton on the CDF, falling back to bisection whenever the step leaves the bracket.
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_beta)
        nxt = x - f / density
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= 1e-17 + 2e-16 * x or nxt == x:
            return nxt
        x = nxt
    return x


def beta_sigmas(steps: int, model_sampling, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """ComfyUI's "beta" scheduler: table entries at rint(beta.ppf(1 - i/steps) * (len - 1)), repeats dropped, then 0."""
    _check_steps(steps)
    table = model_sampling.sigmas
    total = len(table) - 1
    sigmas, last = [], -1
    for i in range(steps):
        p = 1.0 - i * (1.0 / steps)  # numpy.linspace(0, 1, steps, endpoint=False), element by element
        t = round(beta_ppf(p, alpha, beta) * total)  # round() is half-to-even like numpy.rint
        if t != last:
            sigmas.append(float(table[t]))
        last = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def karras_sigmas(steps: int, model_sampling, rho: float = 7.0) -> torch.Tensor:
    """ComfyUI's "karras" scheduler (k-diffusion's get_sigmas_karras between the table's ends), then 0."""
    _check_steps(steps)
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = lo ** (1 / rho), hi ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def exponential_sigmas(steps: int, model_sampling) -> torch.Tensor:
    """ComfyUI's "exponential" scheduler (uniform in log sigma between the table's ends), then 0."""
    _check_steps(steps)
    lo, hi = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    sigmas = torch.linspace(math.log(hi), math.log(lo), steps).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


_SCHEDULER_FNS = {
    "simple": simple_sigmas,
    "normal": normal_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "beta": beta_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
}
SCHEDULERS = tuple(_SCHEDULER_FNS)


def make_sigmas(scheduler: str, steps: int, model_sampling) -> torch.Tensor:
    """A full schedule, as ComfyUI's calculate_sigmas gives it for this model sampling: fp32, ending in 0
    (or, for "normal" on a table that reaches ~0 itself, on that smallest sigma)."""
    if scheduler not in _SCHEDULER_FNS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if isinstance(model_sampling, (int, float)):
        raise TypeError(f"schedulers take a model sampling (e.g. FluxModelSampling({model_sampling})), "
                        f"not the number {model_sampling}")
    return _SCHEDULER_FNS[scheduler](steps, model_sampling)


def ksampler_sigmas(scheduler: str, steps: int, model_sampling, denoise: float | None = 1.0) -> torch.Tensor:
    """ComfyUI's KSampler.set_steps: denoise d < 1 schedules int(steps / d) steps and keeps the last steps + 1."""
    if denoise is None or denoise > 0.9999:
        return make_sigmas(scheduler, steps, model_sampling)
    if denoise <= 0.0:
        make_sigmas(scheduler, 1, model_sampling)  # still reject an unknown scheduler name
        return torch.zeros(0, dtype=torch.float32)
    return make_sigmas(scheduler, int(steps / denoise), model_sampling)[-(steps + 1):]


def prepare_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """Noise exactly as ComfyUI draws it: one CPU generator seeded once, batch_index skips ahead."""
    generator = torch.Generator("cpu").manual_seed(seed)  # same stream as torch.manual_seed, no global side effect
    if batch_index is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    per_item = (1, *shape[1:])
    drawn: dict[int, torch.Tensor] = {}
    for index in range(max(batch_index) + 1):
        noise = torch.randn(per_item, generator=generator, dtype=torch.float32)
        if index in batch_index:
            drawn[index] = noise
    return torch.cat([drawn[i] for i in batch_index], dim=0)


DenoiseFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def sample_euler(denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """k-diffusion's Euler as ComfyUI runs it. denoise(x, sigma) returns the x0 prediction; the state stays fp32."""
    x = x.float()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    total = len(sigmas) - 1
    for i in range(total):
        denoised = denoise(x, float(sigmas[i])).float()
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback(i + 1, total, denoised)
    return x


def sample_dpmpp_2m(denoise: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor,
                    callback: StepCallback | None = None) -> torch.Tensor:
    """k-diffusion's DPM-Solver++(2M) as ComfyUI runs it, in t = -log(sigma) with fp32 sigmas."""
    x = x.float()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    total = len(sigmas) - 1

    def t_fn(sigma):
        return sigma.log().neg()

    def sigma_fn(t):
        return t.neg().exp()

    old_denoised = None
    for i in range(total):
        denoised = denoise(x, float(sigmas[i])).float()
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t  # inf on the last step (sigma 0): the update then returns denoised exactly
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        if callback is not None:
            callback(i + 1, total, denoised)
    return x


_SAMPLER_FNS = {"euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}
SAMPLERS = tuple(_SAMPLER_FNS)


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """fn(denoise, x, sigmas, callback) -> x for a ComfyUI sampler name."""
    if name not in _SAMPLER_FNS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _SAMPLER_FNS[name]


def prepare_mask(noise_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's reshape_mask for image latents: bilinear to the latent size, repeated over channels and batch."""
    b, c, h, w = shape
    mask = noise_mask.float().reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])
    mask = torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear")
    if mask.shape[1] < c:
        mask = mask.repeat(1, c, 1, 1)[:, :c]
    if mask.shape[0] > b:
        return mask.narrow(0, 0, b)
    if mask.shape[0] < b:
        return mask.repeat(math.ceil(b / mask.shape[0]), 1, 1, 1).narrow(0, 0, b)
    return mask


def inpaint_denoiser(denoise: DenoiseFn, mask: torch.Tensor, noise: torch.Tensor, latent_model: torch.Tensor,
                     model_sampling) -> DenoiseFn:
    """ComfyUI's KSamplerX0Inpaint: outside the mask the model sees, and returns, the re-noised original."""
    latent_mask = 1.0 - mask

    def masked(x: torch.Tensor, sigma: float) -> torch.Tensor:
        x = x * mask + model_sampling.noise_scaling(sigma, noise, latent_model) * latent_mask
        return denoise(x, sigma) * mask + latent_model * latent_mask

    return masked


def _axis_size(mesh, axis: str) -> int:
    return mesh.size(axis) if mesh is not None else 1


def batch_split(batch: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) of each dp group's contiguous share, as torch.tensor_split splits: the first ones get one more."""
    base, extra = divmod(batch, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _cond_rows(t, batch: int, start: int, stop: int):
    """The conditioning rows that latent items start..stop see: one row is shared, n rows repeat over the batch."""
    if not _has_batch(t) or t.shape[0] == 1:
        return t
    if t.shape[0] != batch:
        if batch % t.shape[0]:  # same verdict as the serial path, before any rank splits off
            raise ValueError(f"conditioning batch {t.shape[0]} does not divide latent batch {batch}")
        t = t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))
    return t[start:stop]


def _has_batch(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > 0


def _check_cond(name: str, cond, batch: int) -> None:
    """A conditioning dict whose every tensor's batch is 1 or divides the latent batch (the model repeats it)."""
    if not isinstance(cond, Mapping):
        raise TypeError(f"{name} must be a conditioning dict (name -> tensor), got {type(cond).__name__}")
    for t in cond.values():
        if _has_batch(t) and t.shape[0] != 1 and (t.shape[0] == 0 or batch % t.shape[0]):
            raise ValueError(f"conditioning batch {t.shape[0]} does not divide latent batch {batch}")


def _cfg_batch(positive: Mapping, negative: Mapping, n: int) -> dict | None:
    """{name: [cond rows | uncond rows]} for a latent batch of n, or None where the two do not stack (other
    names or shapes, e.g. text lengths)."""
    if positive.keys() != negative.keys():
        return None
    rows = {k: (_cond_rows(positive[k], n, 0, n), _cond_rows(negative[k], n, 0, n)) for k in positive}
    if any(c.shape[1:] != u.shape[1:] for c, u in rows.values()):
        return None
    return {k: torch.cat([c.expand(n, *c.shape[1:]), u.expand(n, *u.shape[1:])]) for k, (c, u) in rows.items()}


def _cfg_parallel(branch: DenoiseFn, cfg: float, group) -> DenoiseFn:
    """This rank's branch (cfg index 0: cond, 1: uncond), swapped with its partner, combined as the serial path does."""

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        mine = branch(x, sigma).contiguous()
        c, u = (torch.empty_like(mine) for _ in range(2))
        dist.all_gather([c, u], mine, group=group)
        return u + (c - u) * cfg

    return denoise


def _gather_batch(x: torch.Tensor, bounds: list[tuple[int, int]], group) -> torch.Tensor:
    """Every dp group's chunk, in batch order, on every rank; padded to one size because all_gather needs it."""
    sizes = [stop - start for start, stop in bounds]
    most = max(sizes)
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) if x.shape[0] < most else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def sample(model, positive: Mapping[str, torch.Tensor], latent: torch.Tensor, seed: int, steps: int,
           cfg: float = 1.0, negative: Mapping[str, torch.Tensor] | None = None,
           batch_index: list[int] | None = None, callback: StepCallback | None = None,
           sampler_name: str = "euler", scheduler: str = "simple", denoise: float = 1.0,
           noise_mask: torch.Tensor | None = None, add_noise: bool = True, start_step: int | None = None,
           last_step: int | None = None, force_full_denoise: bool = False) -> torch.Tensor:
    """ComfyUI's KSampler on a VAE-space LATENT; returns the VAE-space result (ComfyUI's LATENT samples).

    `model` is a model adapter: latent_format, check_latent(shape), model_sampling(shape) (a model
    sampling such as FluxModelSampling or DiscreteFlowModelSampling), denoiser(cond, shape) (fn(x, sigma)
    -> x0 prediction), and optionally `mesh` (a ParallelMesh) and `device`. `positive` and `negative` are
    conditioning dicts, name -> tensor whose first dim is the conditioning batch (1, the latent batch or a
    divisor of it); which names there are is the model family's business, never looked at here.
    cfg != 1 also runs `negative` and combines the x0 predictions as ComfyUI's CFG does. denoise < 1
    starts from the noised `latent` part-way down the schedule (img2img); `noise_mask` (LATENT's
    "noise_mask", 1 = repaint) keeps the rest of `latent`. KSamplerAdvanced's controls: add_noise False starts
    from `latent` with no noise drawn; start_step / last_step run only that part of the schedule (ComfyUI's
    KSampler.sample slicing); force_full_denoise (return_with_leftover_noise off) ends a cut schedule at 0.

    With a mesh, every rank calls this with the same arguments and gets the same full result:
    - dp degree > 1: each dp group samples a contiguous share of the batch (uneven shares allowed;
      a group with no items idles through the steps) with the very noise, conditioning rows and mask
      rows the full-batch run gives those items, then the shares are all-gathered.
    - cfg degree 2: with cfg != 1 and a negative, cfg index 0 runs the cond branch and index 1 the
      uncond branch each step, and both combine the exchanged predictions. With cfg == 1 there is
      only one branch, so both cfg ranks run it (same result, no speed-up).
    `callback` is called on every rank at every step, with that rank's share of the batch.
    """
    run = get_sampler(sampler_name)
    shape = tuple(latent.shape)
    model.check_latent(shape)
    model_sampling = model.model_sampling(shape)
    sigmas = ksampler_sigmas(scheduler, steps, model_sampling, denoise)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent.clone()  # nothing left to run: ComfyUI hands back the input latent
        sigmas = sigmas[start_step:]
    if len(sigmas) == 0:
        return latent.clone()  # ComfyUI hands back the input latent when denoise is 0
    guided = not math.isclose(cfg, 1.0)
    if guided and negative is None:
        raise ValueError(f"cfg {cfg} needs a negative conditioning")
    _check_cond("positive", positive, shape[0])
    if guided:
        _check_cond("negative", negative, shape[0])
    mesh = getattr(model, "mesh", None)
    dp, cfg_degree = _axis_size(mesh, "dp"), _axis_size(mesh, "cfg")
    # Noise is drawn on the CPU (ComfyUI's rule), then the whole loop stays on the model's device:
    # no host round trip per step.
    device = getattr(model, "device", latent.device)
    noise = (prepare_noise(shape, seed, batch_index) if add_noise else torch.zeros(shape)).to(device)
    latent_model = latent.float().to(device)
    if torch.count_nonzero(latent_model) > 0:  # ComfyUI leaves an all-zero (empty) latent unshifted
        latent_model = model.latent_format.to_model(latent_model)
    mask = prepare_mask(noise_mask, shape).to(device) if noise_mask is not None else None
    if dp > 1:
        bounds = batch_split(shape[0], dp)
        start, stop = bounds[mesh.rank("dp")]
        positive = {k: _cond_rows(t, shape[0], start, stop) for k, t in positive.items()}
        if guided:
            negative = {k: _cond_rows(t, shape[0], start, stop) for k, t in negative.items()}
        noise, latent_model = noise[start:stop], latent_model[start:stop]
        mask = mask[start:stop] if mask is not None else None
    chunk = (noise.shape[0], *shape[1:])
    if isinstance(model_sampling, DiscreteModelSampling):  # KSampler's rule for EPS / V models
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_model, max_denoise(model_sampling, sigmas))
    else:
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_model)
    if chunk[0] == 0:
        def denoise_fn(x, sigma):  # more dp groups than items: keep step with the others, run nothing
            return x
    elif guided and cfg_degree > 1:
        branch = negative if mesh.rank("cfg") == 1 else positive
        denoise_fn = _cfg_parallel(model.denoiser(branch, chunk), cfg, mesh.group("cfg"))
    elif guided and (both := _cfg_batch(positive, negative, chunk[0])) is not None:
        # cond and uncond as one batch of 2n, as ComfyUI batches them: one forward per step, and larger GEMMs
        # (SD3.5 Large 1024 px on one H200: 5.31 s -> see BENCHMARKS.md)
        pair = model.denoiser(both, (2 * chunk[0], *chunk[1:]))

        def denoise_fn(x, sigma):
            c, u = pair(torch.cat([x, x]), sigma).chunk(2)
            return u + (c - u) * cfg
    elif guided:  # conditioning of different shapes (text lengths): two forwards
        cond = model.denoiser(positive, chunk)
        uncond = model.denoiser(negative, chunk)

        def denoise_fn(x, sigma):
            u = uncond(x, sigma)
            return u + (cond(x, sigma) - u) * cfg
    else:
        denoise_fn = model.denoiser(positive, chunk)
    if mask is not None and chunk[0] > 0:
        denoise_fn = inpaint_denoiser(denoise_fn, mask, noise, latent_model, model_sampling)
    x = run(denoise_fn, x, sigmas, callback)
    x = model_sampling.inverse_noise_scaling(sigmas[-1], x)  # the last sigma is (about) 0: (about) x
    if dp > 1:
        x = _gather_batch(x, bounds, mesh.group("dp"))
    return model.latent_format.from_model(x)
