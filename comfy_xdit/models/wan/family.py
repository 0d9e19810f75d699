"""Wan 2.1 / 2.2 as a model family: diffusers' WanTransformer3DModel on 5-D video latents [B, C, t, h, w].

Tokens are (frame, row, col), frame-major, one per 1x2x2 patch; 3-D RoPE over the same positions. Each block is
self-attention over the video tokens (sharded by USP like any image tokens), cross-attention to the text that
every rank holds whole (USPAttention.cross: only Q and the output cross the Ulysses group), and for the I2V
models a second cross-attention to the CLIP-vision tokens. ComfyUI's model sampling: discrete flow, shift 8.0,
timestep = sigma * 1000 (supported_models.WAN21_T2V; ModelSamplingSD3 changes the shift). Image-to-video
conditioning arrives as ComfyUI's WanImageToVideo gives it (concat_latent_image + concat_mask, and CLIP-vision
penultimate states as clip_fea) and is concatenated as comfy.model_base.WAN21.concat_cond does.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from ...sampling import DiscreteFlowModelSampling, LatentFormat
from ..family import Family, Step
from .checkpoint import WAN_BLOCKS, detect_wan_layout, load_wan_transformer, read_wan_info, real_rope, wan_variant
from .random import WAN_PRESETS

# ComfyUI's latent_formats.Wan21 / Wan22 (per-channel statistics of the Wan 2.1 and Wan 2.2 VAEs)
WAN21_LATENT = LatentFormat(channels=16, scale=1.0, dims=3, mean=(
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921), std=(
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160))
WAN22_LATENT = LatentFormat(channels=48, scale=1.0, dims=3, mean=(
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667), std=(
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744))
WAN_SHIFT = 8.0        # ComfyUI's sampling_settings for every Wan 2.1 / 2.2 model
TIMESTEP_SCALE = 1000  # ModelSamplingDiscreteFlow's multiplier
MASK_CHANNELS = 4      # I2V: 4 mask channels in front of the image latent (WAN21.concat_cond)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan RoPE (interleaved pairs) on [B, S, H, D] with cos/sin [S, 1, D]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanAttnProcessor:
    """diffusers' WanAttnProcessor with the attention calls swapped for the sequence-parallel ones: self-attention
    through state.attention (the video tokens are sharded), cross-attention through state.cross (text, and
    the I2V image tokens, replicated). The image-context length comes from the state (ComfyUI passes it as
    clip_fea's length), not from diffusers' assumption of 512 text tokens."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **_unused):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported for Wan")
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        image_context = None
        img_len = getattr(self.state, "image_context_len", 0)
        if cross and attn.add_k_proj is not None and img_len:
            image_context, context = context[:, :img_len], context[:, img_len:]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        run = self.state.cross if cross else self.state.attention
        out = run(q, k, v).flatten(2, 3).type_as(q)
        if image_context is not None:
            ki = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (attn.heads, -1))
            vi = attn.add_v_proj(image_context).unflatten(2, (attn.heads, -1))
            out = out + self.state.cross(q, ki, vi).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class WanFamily(Family):
    name, label = "wan", "Wan 2.1 / 2.2"
    transformer_class = WanTransformer3DModel
    blocks = WAN_BLOCKS
    latent_format = WAN21_LATENT
    patch_size = 2
    conditioning = ("context",)
    comfy_inputs = {"context": "context", "clip_fea": "clip_fea"}
    presets = WAN_PRESETS
    guided = True              # Wan runs at cfg 5-6 with a negative prompt
    cross_attention = True     # text is replicated, never in the sharded sequence
    own_processors = True      # diffusers' processor assumes 512 text tokens for I2V: ours always runs
    video = True

    def detect(self, keys):
        return detect_wan_layout(keys)

    def read_info(self, path):
        return read_wan_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_wan_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage, progress=progress)

    def variant(self, config):
        return wan_variant(config)

    def random(self, config, seed=0, dtype=torch.float32, device="cpu", fp8=False, stage=None):
        return real_rope(super().random(config, seed=seed, dtype=dtype, device=device, fp8=fp8, stage=stage), device)

    def load_lora(self, path, shapes):
        from .lora import load_wan_lora

        return load_wan_lora(path, shapes)

    def latent_format_for(self, config) -> LatentFormat:
        return WAN22_LATENT if config["out_channels"] == 48 else WAN21_LATENT

    def model_sampling(self, config, latent_shape, shift=None):
        return DiscreteFlowModelSampling(WAN_SHIFT if shift is None else shift, multiplier=TIMESTEP_SCALE)

    def token_grid(self, latent_shape):
        """(frames x token rows, tokens per row): rows are frame-major, so PipeFusion's row patches run through
        the frames in order. A 4-D shape counts as one frame (memory estimates ask with image shapes)."""
        h, w = latent_shape[-2:]
        frames = latent_shape[2] if len(latent_shape) == 5 else 1
        return frames * (h // self.patch_size), w // self.patch_size

    def check_latent(self, config, latent_shape):
        fmt = self.latent_format_for(config)
        if len(latent_shape) != 5:
            raise ValueError(f"{self.label} takes video latents [B, C, frames, h, w]; got shape {tuple(latent_shape)} "
                             f"(use EmptyHunyuanLatentVideo, or Wan22ImageToVideoLatent for the 5B model)")
        c, (h, w) = latent_shape[1], latent_shape[-2:]
        if c != fmt.channels and c != config["in_channels"]:  # the latter: ComfyUI's c_concat already joined
            raise ValueError(f"this {self.variant(config)} model takes {fmt.channels}-channel latents, got {c}")
        px = 16 if fmt.channels == 48 else 8  # the Wan 2.2 VAE compresses 16x, the Wan 2.1 VAE 8x
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"a {w * px}x{h * px} px video (width x height; latent {w}x{h}) does not split into "
                             f"2x2 patches: {self.label} needs sizes that are multiples of {2 * px} px")

    def prepare_conditioning(self, config, cond: dict, latent_shape: tuple) -> dict:
        """ComfyUI's WAN21.concat_cond, once per sampling run: an I2V model's extra input channels from the
        conditioning's concat_latent_image (VAE space) and concat_mask (1 = generate), or zeros without them."""
        extra = config["in_channels"] - latent_shape[1]
        image, mask = cond.pop("concat_latent_image", None), cond.pop("concat_mask", None)
        if extra <= 0:
            return cond
        b, _, t, h, w = latent_shape
        fmt = self.latent_format_for(config)
        if image is None:
            image = torch.zeros(b, extra, t, h, w)
        else:
            if tuple(image.shape[-3:]) != (t, h, w) and tuple(image.shape[-2:]) != (h, w):
                raise ValueError(f"the image conditioning's latent is {tuple(image.shape[-3:])} (frames, h, w) but "
                                 f"the video latent is {(t, h, w)}: give WanImageToVideo the same size and length")
            image = torch.cat([fmt.to_model(image[:, i:i + fmt.channels].float())
                               for i in range(0, image.shape[1], fmt.channels)], dim=1)
            image = _batch(image, b)
        if extra != image.shape[1] + MASK_CHANNELS and extra == image.shape[1]:
            cond["concat"] = image  # an image latent alone fills the extra channels: no mask
            return cond
        image = image[:, :extra - MASK_CHANNELS]
        if mask is None:
            mask = torch.zeros(b, MASK_CHANNELS, t, h, w)
        else:
            mask = mask.float()
            if mask.shape[1] != MASK_CHANNELS:
                mask = mask.mean(dim=1, keepdim=True)
            mask = 1.0 - mask
            if tuple(mask.shape[-2:]) != (h, w):
                raise ValueError(f"the image conditioning's mask is {tuple(mask.shape[-2:])} but the latent is "
                                 f"{(h, w)}: give WanImageToVideo the same size")
            if mask.shape[2] < t:
                mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, t - mask.shape[2]))
            if mask.shape[1] == 1:
                mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
            mask = _batch(mask, b)
        image = torch.cat([mask, image], dim=1)
        if image.shape[1] != extra:
            raise ValueError(f"this model takes {extra} conditioning channels beside the latent; the image "
                             f"conditioning gives {image.shape[1]}")
        cond["concat"] = image
        return cond

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What diffusers' WanTransformer3DModel.forward computes before its blocks."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        if "concat" in cond:  # I2V: the conditioning channels beside the noisy latent (ComfyUI's c_concat)
            x = torch.cat([x, cond["concat"].to(x.device, x.dtype)], dim=1)
        rows, cols = self.token_grid(tuple(x.shape))
        clip = cond.get("clip_fea")
        temb, proj, context, image_context = t.condition_embedder(
            sigma.to(dtype) * TIMESTEP_SCALE, cond["context"].to(dtype), None if clip is None else clip.to(dtype))
        cos, sin = (f[0].float() for f in t.rope(x))  # [S, 1, D]; diffusers keeps them in fp64
        if image_context is not None and image_context.shape[0] != context.shape[0]:
            image_context = image_context.expand(context.shape[0], -1, -1)
        text = context if image_context is None else torch.cat([image_context, context], dim=1)
        step = Step(temb=proj.unflatten(1, (6, -1)), text_len=text.shape[1], image_len=rows * cols,
                    rope=(cos, sin), text=text,
                    extra=dict(head_temb=temb, image_context_len=0 if image_context is None else image_context.shape[1]))
        if embed:
            step.image = t.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        return step

    def run_block(self, block, image, text, step, rope):
        return block(image, text, step.temb, rope), text

    def head(self, transformer, image, step):
        t = transformer
        shift, scale = (t.scale_shift_table.to(image.device) + step.extra["head_temb"].unsqueeze(1)).chunk(2, dim=1)
        return t.proj_out((t.norm_out(image.float()) * (1 + scale) + shift).type_as(image))

    def unpatchify(self, tokens, latent_shape):
        b, _, f, h, w = latent_shape
        x = tokens.reshape(b, f, h // 2, w // 2, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, -1, f, h, w)

    def attention_modules(self, block):
        return [(block.attn1, False), (block.attn2, False)]

    def processor(self, state, image_only=False):
        return WanAttnProcessor(state)


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    """ComfyUI's resize_to_batch_size for the common cases: equal, one row repeated, or a divisor repeated."""
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"image conditioning batch {t.shape[0]} does not divide latent batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.dim() - 1)))


WAN = WanFamily()
