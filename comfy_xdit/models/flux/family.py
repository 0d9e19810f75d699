"""Flux.1 as a model family: packed 2x2 latent tokens, RoPE over (0, row, col) ids, guidance embedding (dev),
ComfyUI's ModelSamplingFlux, and the double + single block list of diffusers' FluxTransformer2DModel."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformer2DModel

from ...sampling import FluxModelSampling, LatentFormat
from ..family import Family, Step
from .checkpoint import FLUX_BLOCKS, detect_layout_or_none, flux_variant, load_flux_transformer, read_flux_info
from .random import PRESETS, flux_config

FLUX_LATENT = LatentFormat(channels=16, scale=0.3611, shift=0.1159)
PATCH = 2  # Flux packs 2x2 latent pixels into one token
DEFAULT_GUIDANCE = 3.5
# ComfyUI's sampling_settings: Flux dev samples with ModelSamplingFlux's default shift, schnell with 1.0
FLUX_SHIFT = {"dev": 1.15, "schnell": 1.0}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], row-major tokens (BFL's rearrange)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """RoPE position ids (0, row, col) per image token, for a latent of h x w."""
    ids = torch.zeros(h // PATCH, w // PATCH, 3)
    ids[..., 1] = torch.arange(h // PATCH)[:, None]
    ids[..., 2] = torch.arange(w // PATCH)[None, :]
    return ids.reshape(-1, 3)


class FluxFamily(Family):
    name, label = "flux", "Flux.1"
    transformer_class = FluxTransformer2DModel
    blocks = FLUX_BLOCKS
    latent_format = FLUX_LATENT
    patch_size = PATCH
    conditioning = ("context", "pooled")
    presets = {name: flux_config(name) for name in PRESETS}

    def detect(self, keys):
        return detect_layout_or_none(keys)

    def read_info(self, path):
        return read_flux_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_flux_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage, progress=progress)

    def variant(self, config):
        return flux_variant(config)

    def load_lora(self, path, shapes):
        from .lora import load_flux_lora

        return load_flux_lora(path, shapes)

    def load_controlnet(self, path, dtype, device):
        from .controlnet import load_flux_controlnet

        return load_flux_controlnet(path, dtype=dtype, device=device)

    def with_controls(self, model, controls):
        from .controlnet import ControlledFluxModel, FluxControl

        return ControlledFluxModel(model, [FluxControl(**c) for c in controls])

    def model_sampling(self, config, latent_shape, shift=None):
        """ComfyUI's rule: a constant shift (dev 1.15, schnell 1.0) at every size, unless a ModelSamplingFlux node
        sets one from its width and height (ModelSamplingFlux (xDiT): sampling.resolution_shift)."""
        if shift is None:
            shift = FLUX_SHIFT[flux_variant(config)]
        return FluxModelSampling(shift)

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What diffusers' FluxTransformer2DModel.forward computes before its blocks."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        b, _, h, w = x.shape
        context, pooled = cond["context"], cond["pooled"]
        packed = pack_latents(x.to(dtype))
        guidance = None
        if t.config.guidance_embeds:
            guidance = cond.get("guidance")
            guidance = (torch.full((b,), DEFAULT_GUIDANCE, device=x.device) if guidance is None
                        else guidance.reshape(-1).expand(b))
        timestep = sigma.to(dtype) * 1000
        temb = (t.time_text_embed(timestep, pooled) if guidance is None
                else t.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled))
        img_ids = image_ids(h, w).to(x.device, dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=dtype)
        step = Step(temb=temb, text_len=context.shape[1], image_len=packed.shape[1],
                    rope=t.pos_embed(torch.cat((txt_ids, img_ids), dim=0)),
                    control=dict(hidden_states=packed, timestep=sigma, img_ids=img_ids, pooled_projections=pooled,
                                 guidance=guidance))
        if embed:
            step.image, step.text = t.x_embedder(packed), t.context_embedder(context)
        return step

    def unpatchify(self, tokens, latent_shape):
        return unpack_latents(tokens, *latent_shape[-2:])

    def attention_modules(self, block):
        return [(m, False) for m in block.modules() if isinstance(m, FluxAttention)]


FLUX = FluxFamily()
