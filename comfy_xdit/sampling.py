"""Flow-matching sampling on plain tensors, following ComfyUI's conventions.

Every rank runs this loop in lockstep on identical inputs: noise comes from the seed on
the CPU (as ComfyUI's KSampler draws it), so no broadcast of the starting latent is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

SIGMA_TABLE_SIZE = 10000  # ComfyUI's ModelSamplingFlux timesteps


@dataclass(frozen=True)
class LatentFormat:
    """VAE latent <-> model space: model = (latent - shift) * scale."""

    channels: int
    scale: float
    shift: float

    def to_model(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift) * self.scale

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.shift


def flux_shift_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15,
                  base_tokens: int = 256, max_tokens: int = 4096) -> float:
    """Resolution-dependent time shift: linear in image tokens (ComfyUI's ModelSamplingFlux)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (image_tokens - base_tokens)


def flux_time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def sigma_table(mu: float) -> torch.Tensor:
    t = torch.arange(1, SIGMA_TABLE_SIZE + 1, dtype=torch.float64) / SIGMA_TABLE_SIZE
    return flux_time_shift(mu, t).float()  # ComfyUI keeps its table in fp32


def simple_sigmas(steps: int, mu: float) -> torch.Tensor:
    """ComfyUI's "simple" scheduler: evenly spaced picks from the end of the table, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    table = sigma_table(mu)
    stride = len(table) / steps
    picks = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(picks + [0.0], dtype=torch.float32)


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
    """Euler on the flow ODE. denoise(x, sigma) returns the x0 prediction; the state stays fp32."""
    x = x.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma).float()
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
        if callback is not None:
            callback(i + 1, len(sigmas) - 1, denoised)
    return x


def noise_latent(latent_model: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow matching: x_t = sigma * noise + (1 - sigma) * x0."""
    return sigma * noise + (1.0 - sigma) * latent_model


def sample(model, context: torch.Tensor, pooled: torch.Tensor, latent: torch.Tensor, seed: int, steps: int,
           guidance: float | None = None, cfg: float = 1.0, negative: tuple | None = None,
           batch_index: list[int] | None = None, callback: StepCallback | None = None) -> torch.Tensor:
    """Text-to-image from a VAE-space LATENT; returns the VAE-space result (ComfyUI's LATENT samples).

    `model` is a model adapter: latent_format, check_latent, time_shift_mu, denoiser.
    cfg > 1 runs `negative` = (context, pooled) and combines the x0 predictions as ComfyUI's CFG does.
    """
    shape = tuple(latent.shape)
    model.check_latent(shape)
    sigmas = simple_sigmas(steps, model.time_shift_mu(shape))
    noise = prepare_noise(shape, seed, batch_index)
    x = noise_latent(model.latent_format.to_model(latent.float()), noise, float(sigmas[0]))
    cond = model.denoiser(context, pooled, guidance, shape)
    if cfg == 1.0:
        denoise = cond
    else:
        if negative is None:
            raise ValueError(f"cfg {cfg} needs a negative conditioning")
        uncond = model.denoiser(negative[0], negative[1], guidance, shape)

        def denoise(x, sigma):
            u = uncond(x, sigma)
            return u + cfg * (cond(x, sigma) - u)

    return model.latent_format.from_model(sample_euler(denoise, x, sigmas, callback))
