"""PixArt-α / PixArt-Σ as a model family: diffusers' PixArtTransformer2DModel on ComfyUI's terms.

Each block is adaLN-single-modulated self-attention over the image tokens (sharded by USP like any image
tokens), cross-attention to the T5 text that every rank holds whole (USPAttention.cross: only Q and the output
cross the Ulysses group), and an MLP. What ComfyUI's PixArtMS (comfy/ldm/pixart) computes, and so this does:

- model sampling: ModelSamplingDiscrete with eps prediction on a sqrt_linear schedule 0.0001 .. 0.02 over 1000
  steps (supported_models.PixArtAlpha / PixArtSigma); the model sees x / sqrt(sigma^2 + 1) (the denoiser's
  calculate_input) and the table index nearest to sigma as its timestep;
- latents: SD1.5's format for PixArt-α, SDXL's for PixArt-Σ, as ComfyUI tells them apart: α is the model with
  micro-conditions (ComfyUI's detection: ``ar_embedder``), so an original α 256 / 512 file, which has none, gets
  Σ's format there too;
- positions: fixed 2-D sin-cos, recomputed for every latent size as ComfyUI does: interpolation from the file's
  ``pos_embed`` table (config interpolation_scale) or, without one, round(mean side / 64); base size
  round(mean side / 64) * 64 / patch; width half first, then height. Under 256 px (mean latent side < 32),
  where ComfyUI's formula divides by zero, both count as 1;
- micro-conditions (α 1024-MS): the image size [height, width] in pixels and the aspect ratio height / width,
  from the conditioning (ComfyUI's CLIPTextEncodePixArtAlpha width / height: c_size, c_ar) or, as ComfyUI
  defaults them, from the latent's size; PixArt-Σ has none and ignores them;
- text: the T5 states with no mask (ComfyUI passes none); the output is the eps half of the 8 channels
  (learned sigma dropped), which the head keeps alone so only those cross the sequence-parallel gather.
"""

from __future__ import annotations

import functools

import torch
from diffusers import PixArtTransformer2DModel

from ...sampling import DiscreteModelSampling, LatentFormat
from ..family import Family, Step
from .checkpoint import (PE_LATENT, PIXART_BLOCKS, detect_pixart_layout, load_pixart_transformer, pixart_variant,
                         read_pixart_info, real_pos_embed)
from .random import PIXART_PRESETS

# ComfyUI's latent_formats.SD15 (PixArt-α) and SDXL (PixArt-Σ): 4 channels, scale only
SD15_LATENT = LatentFormat(channels=4, scale=0.18215)
SDXL_LATENT = LatentFormat(channels=4, scale=0.13025)
# ComfyUI's sampling_settings for both PixArt models (eps prediction)
PIXART_SCHEDULE = ("sqrt_linear", 0.0001, 0.02)
PATCH = 2
PIXELS = 8  # the VAE's pixels per latent pixel (ComfyUI's micro-condition defaults count pixels)


@functools.cache
def pixart_sampling() -> DiscreteModelSampling:
    """ComfyUI's ModelSamplingDiscrete for PixArt (one schedule for α and Σ), built once per process."""
    return DiscreteModelSampling(*PIXART_SCHEDULE, timesteps=1000, prediction="eps")


def position_scales(latent_h: int, latent_w: int, patch: int, interpolation) -> tuple[float, int]:
    """(interpolation, base size in tokens) of ComfyUI's PixArt positions for a latent: a fixed interpolation
    (the file's) or round(mean side / 64) (Python's round, half to even, as ComfyUI's), and a base of
    round(mean side / 64) * 64 latent pixels; a rounding to 0 counts as 1 (ComfyUI divides by zero there)."""
    units = round(((latent_h + latent_w) // 2) / PE_LATENT) or 1
    return (units if interpolation is None else interpolation), (units * PE_LATENT) // patch


def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin | cos] of positions times dim / 2 frequencies 10000^(-i / (dim / 2)), in pos's dtype."""
    freq = torch.arange(dim // 2, device=pos.device, dtype=pos.dtype)
    freq /= dim / 2.0
    freq = 1.0 / 10000 ** freq
    angle = torch.einsum("m,d->md", pos.reshape(-1), freq)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


@functools.lru_cache(maxsize=8)
def comfy_positions(width: int, rows: int, cols: int, interpolation: float, base: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """ComfyUI's PixArt sin-cos positions [rows * cols, width] of row-major tokens, computed in the model's
    dtype as ComfyUI computes them: each axis index / (side / base) / interpolation, the width half first."""
    grid_h, grid_w = torch.meshgrid(
        torch.arange(rows, device=device, dtype=dtype) / (rows / base) / interpolation,
        torch.arange(cols, device=device, dtype=dtype) / (cols / base) / interpolation, indexing="ij")
    return torch.cat([_sincos(width // 2, grid_w), _sincos(width // 2, grid_h)], dim=1)


class PixArtAttnProcessor:
    """diffusers' attention for PixArt's attn1 / attn2 (no norms, no mask) with the attention calls swapped for the
    sequence-parallel ones: self-attention through state.attention (the image tokens are sharded; PipeFusion's
    stale K/V), cross-attention through state.cross (the text, replicated)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_unused):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported for PixArt (ComfyUI passes none)")
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        k = attn.to_k(context).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        out = (self.state.cross if cross else self.state.attention)(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _micro(value, default: list, b: int, dtype, device) -> torch.Tensor:
    """A micro-condition [b, n]: the conditioning's rows (one repeated to the batch), else ComfyUI's default."""
    if value is None:
        return torch.tensor(default, dtype=dtype, device=device).repeat(b, 1)
    value = value.to(device, dtype).reshape(value.shape[0], -1)
    return value if value.shape[0] == b else value.repeat(b // value.shape[0], 1)


class PixArtFamily(Family):
    name, label = "pixart", "PixArt-α / PixArt-Σ"
    transformer_class = PixArtTransformer2DModel
    blocks = PIXART_BLOCKS
    latent_format = SDXL_LATENT
    patch_size = PATCH
    conditioning = ("context",)
    # model_base.PixArt's extra_conds: the size and aspect ratio micro-conditions beside the T5 states
    comfy_inputs = {"context": "context", "c_size": "c_size", "c_ar": "c_ar"}
    presets = PIXART_PRESETS
    guided = True              # PixArt runs at cfg 4.5 with a negative prompt
    cross_attention = True     # text is replicated, never in the sharded sequence
    own_processors = True      # one processor (and kernel) on one rank and many

    def detect(self, keys):
        return detect_pixart_layout(keys)

    def read_info(self, path):
        return read_pixart_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_pixart_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage, progress=progress)

    def random(self, config, seed=0, dtype=torch.float32, device="cpu", fp8=False, stage=None):
        model = super().random(config, seed=seed, dtype=dtype, device=device, fp8=fp8, stage=stage)
        return real_pos_embed(model, device)

    def variant(self, config):
        return pixart_variant(config)

    def load_lora(self, path, shapes):
        from .lora import load_pixart_lora

        return load_pixart_lora(path, shapes)

    def latent_format_for(self, config) -> LatentFormat:
        return SD15_LATENT if config["use_additional_conditions"] else SDXL_LATENT

    def model_sampling(self, config, latent_shape, shift=None):
        if shift is not None:
            raise ValueError(f"{self.label} samples with discrete DDPM steps (eps prediction), which have no shift: "
                             "remove the ModelSampling (xDiT) node for this model")
        return pixart_sampling()

    def check_latent(self, config, latent_shape):
        if len(latent_shape) != 4:
            raise ValueError(f"{self.label} makes images: latents [B, C, h, w], got shape {tuple(latent_shape)} "
                             "(use EmptyLatentImage)")
        c, (h, w) = latent_shape[1], latent_shape[-2:]
        if c != config["in_channels"]:
            raise ValueError(f"{self.label} latents have {config['in_channels']} channels, got {c} "
                             "(use EmptyLatentImage, not EmptySD3LatentImage)")
        if h % PATCH or w % PATCH:
            raise ValueError(f"a {w * PIXELS}x{h * PIXELS} px image (width x height; latent {w}x{h}) does not split "
                             f"into {PATCH}x{PATCH} patches: {self.label} needs image sizes that are multiples of "
                             f"{PATCH * PIXELS} px")

    def prepare_conditioning(self, config, cond, latent_shape):
        """The micro-conditions as [N, 2] (height, width in pixels) and [N, 1] (height / width) for PixArt-α;
        dropped for a model without them (ComfyUI's PixArt-Σ ignores them)."""
        if not config["use_additional_conditions"]:
            cond.pop("c_size", None)
            cond.pop("c_ar", None)
            return cond
        for name, n in (("c_size", 2), ("c_ar", 1)):
            value = cond.get(name)
            if value is None:
                continue
            if value.dim() == 1 and n == 1:
                value = value[:, None]
            if value.dim() != 2 or value.shape[1] != n:
                raise ValueError(f"the {name} micro-condition must be [N, {n}] (ComfyUI's "
                                 f"{'[[height, width]]' if n == 2 else '[[height / width]]'}), got shape "
                                 f"{tuple(value.shape)}")
            cond[name] = value.float()
        return cond

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What ComfyUI's PixArtMS.forward_orig computes before its blocks (x already scaled by c_in)."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        config = t.config
        b, _, h, w = x.shape
        rows, cols = h // PATCH, w // PATCH
        timestep = pixart_sampling().timestep(sigma.float()).float().to(x.device)
        added = {"resolution": None, "aspect_ratio": None}
        if config.use_additional_conditions:
            added = {"resolution": _micro(cond.get("c_size"), [h * PIXELS, w * PIXELS], b, dtype, x.device),
                     "aspect_ratio": _micro(cond.get("c_ar"), [h / w], b, dtype, x.device)}
        temb, embedded = t.adaln_single(timestep, added, batch_size=b, hidden_dtype=dtype)
        context = cond["context"].to(x.device, dtype)
        if context.shape[0] != b:
            context = context.repeat(b // context.shape[0], 1, 1)
        text = t.caption_projection(context)
        step = Step(temb=temb, text_len=text.shape[1], image_len=rows * cols, text=text,
                    extra=dict(head_temb=embedded))
        if embed:
            interpolation, base = position_scales(h, w, PATCH, config.interpolation_scale)
            pos = comfy_positions(self.width(config), rows, cols, interpolation, base, dtype, x.device)
            step.image = t.pos_embed.proj(x.to(dtype)).flatten(2).transpose(1, 2) + pos
        return step

    def run_block(self, block, image, text, step, rope):
        return block(image, encoder_hidden_states=text, timestep=step.temb), text

    def head(self, transformer, image, step):
        """T2IFinalLayer per token, keeping the eps channels (the first in_channels of each patch pixel's
        out_channels; PixArt's learned sigma is not used)."""
        t = transformer
        shift, scale = (t.scale_shift_table[None].to(image.dtype) + step.extra["head_temb"][:, None]).chunk(2, dim=1)
        out = t.proj_out(t.norm_out(image) * (1 + scale) + shift)
        c, out_c = t.config.in_channels, t.config.out_channels
        if out_c == c:
            return out
        return out.unflatten(-1, (PATCH * PATCH, out_c))[..., :c].flatten(-2)

    def unpatchify(self, tokens, latent_shape):
        """[B, S, p * p * C] row-major tokens (each patch pixel's channels fastest) -> [B, C, h, w]."""
        b, c, h, w = latent_shape
        x = tokens.reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def attention_modules(self, block):
        return [(block.attn1, False), (block.attn2, False)]

    def processor(self, state, image_only=False):
        return PixArtAttnProcessor(state)


PIXART = PixArtFamily()
