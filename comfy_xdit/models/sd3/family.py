"""SD3 / SD3.5 as a model family: diffusers' SD3Transformer2DModel (MMDiT; MMDiT-X dual attention in SD3.5
Medium, q/k RMSNorm in SD3.5 Medium and Large), patch embedding with a cropped position table, ComfyUI's
discrete-flow model sampling (shift 3.0) and the SD3 latent format."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from ...sampling import DiscreteFlowModelSampling, LatentFormat
from ..family import Family, Step
from .checkpoint import SD3_BLOCKS, detect_sd3_layout, load_sd3_transformer, read_sd3_info, sd3_variant
from .random import SD3_PRESETS

SD3_LATENT = LatentFormat(channels=16, scale=1.5305, shift=0.0609)
SD3_SHIFT = 3.0        # ComfyUI's sampling_settings for SD3 / SD3.5 (ModelSamplingSD3 changes it)
TIMESTEP_SCALE = 1000  # ModelSamplingDiscreteFlow's multiplier: the transformer takes sigma * 1000


class SD3Family(Family):
    name, label = "sd3", "SD3 / SD3.5"
    transformer_class = SD3Transformer2DModel
    blocks = SD3_BLOCKS
    latent_format = SD3_LATENT
    patch_size = 2
    conditioning = ("context", "pooled")
    presets = SD3_PRESETS
    guided = True  # SD3 / SD3.5 run at cfg 4-5

    def detect(self, keys):
        return detect_sd3_layout(keys)

    def read_info(self, path):
        return read_sd3_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_sd3_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage, progress=progress)

    def variant(self, config):
        return sd3_variant(config)

    def load_lora(self, path, shapes):
        from .lora import load_sd3_lora

        return load_sd3_lora(path, shapes)

    def model_sampling(self, config, latent_shape, shift=None):
        return DiscreteFlowModelSampling(SD3_SHIFT if shift is None else shift, multiplier=TIMESTEP_SCALE)

    def check_latent(self, config, latent_shape):
        super().check_latent(config, latent_shape)
        rows, cols = self.token_grid(latent_shape)
        most = config.get("pos_embed_max_size")
        if most is not None and max(rows, cols) > most:
            px = most * self.patch_size * 8
            raise ValueError(f"{latent_shape[-1] * 8}x{latent_shape[-2] * 8} px is larger than this model's position "
                             f"table ({most}x{most} tokens): use at most {px} px per side")

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What diffusers' SD3Transformer2DModel.forward computes before its blocks."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        context, pooled = cond["context"], cond["pooled"]
        rows, cols = self.token_grid(tuple(x.shape))
        step = Step(temb=t.time_text_embed(sigma * TIMESTEP_SCALE, pooled), text_len=context.shape[1],
                    image_len=rows * cols)
        if embed:  # pos_embed's output is non-contiguous (flatten + transpose in PatchEmbed)
            step.image = t.pos_embed(x.to(dtype)).contiguous()
            step.text = t.context_embedder(context)
        return step

    def unpatchify(self, tokens, latent_shape):
        b, _, h, w = latent_shape
        p = self.patch_size
        x = tokens.reshape(b, h // p, w // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h, w)

    def attention_modules(self, block):
        found = [(block.attn, False)]
        if getattr(block, "attn2", None) is not None:  # SD3.5 Medium's MMDiT-X: image-only self-attention
            found.append((block.attn2, True))
        return found


SD3 = SD3Family()
