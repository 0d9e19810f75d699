"""Qwen-Image (and Qwen-Image-Edit) as a model family: diffusers' QwenImageTransformer2DModel, an MMDiT of 60
dual-stream blocks (joint attention over [text | image], like Flux's double blocks), on ComfyUI's terms:

- latents: the Wan 2.1 VAE's 16 channels (latent_formats.Wan21), 5-D [B, 16, 1, h, w] as ComfyUI's samplers
  hold them (a 4-D EmptySD3LatentImage latent gains the frame axis, as comfy.sample.fix_empty_latent_channels
  does); 2x2 patches packed as Flux packs them;
- RoPE: ComfyUI's position ids (comfy/ldm/qwen_image/model.py): image tokens at (index, row - rows // 2,
  col - cols // 2), text tokens at (n, n, n) from n = max(rows, cols) // 2, over axes (16, 56, 56) of each head;
  the joint rows are sliced with the tokens a rank holds, so the text splits with the image under Ulysses / Ring;
- model sampling: ModelSamplingFlux with shift 1.15 (supported_models.QwenImage, ModelType.FLUX: the
  transformer takes sigma itself); a ModelSampling (xDiT) shift (ModelSamplingAuraFlow's) switches to discrete
  flow with multiplier 1.0, as ModelSamplingAuraFlow does on a MODEL;
- conditioning: the Qwen2.5-VL text encoder's hidden states [B, T, 3584], no pooled output; ComfyUI's Qwen-Image
  model takes no text mask (model_base.QwenImage passes none), so neither does this;
- Qwen-Image-Edit: the reference latents (TextEncodeQwenImageEdit / ReferenceLatent) are packed and appended
  after the image tokens, at frame index 1, 2, ... ("index") or all at 1 with row / column offsets ("offset"), as
  ComfyUI does; they join the sharded sequence, and only the image tokens' output is kept.
"""

from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ...sampling import DiscreteFlowModelSampling, FluxModelSampling
from ...stepwise import pad_to_patches
from ..family import Family, Step
from ..wan.family import WAN21_LATENT
from .checkpoint import (QWEN_BLOCKS, detect_qwen_layout, load_qwen_transformer, qwen_variant, read_qwen_info,
                         real_rope)
from .random import QWEN_PRESETS

PATCH = 2
QWEN_SHIFT = 1.15      # ComfyUI's sampling_settings for Qwen-Image (ModelSamplingFlux's mu)
AURAFLOW_MULTIPLIER = 1.0  # ModelSamplingAuraFlow's: the transformer takes sigma, not sigma * 1000
REF_METHODS = ("index", "offset")  # ComfyUI's reference_latents_method values for Qwen-Image


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], row-major tokens (ComfyUI's process_img)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def image_ids(rows: int, cols: int, index: int = 0, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """ComfyUI's RoPE ids (index, row, col) of a rows x cols token grid, centred on the grid."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = (torch.arange(rows) + row_offset - rows // 2)[:, None].float()
    ids[..., 2] = (torch.arange(cols) + col_offset - cols // 2)[None, :].float()
    return ids.reshape(-1, 3)


def reference_ids(refs: list, method: str) -> list[torch.Tensor]:
    """RoPE ids of each reference latent's tokens, as ComfyUI's QwenImageTransformer2DModel places them."""
    out, h, w = [], 0, 0
    for i, ref in enumerate(refs):
        rh, rw = ref.shape[-2:]
        if method == "index":
            index, h_off, w_off = i + 1, 0, 0
        else:  # "offset": one frame index, the references side by side (or stacked) in the row/col plane
            index, h_off, w_off = 1, 0, 0
            if rh + h > rw + w:
                w_off = w
            else:
                h_off = h
            h, w = max(h, rh + h_off), max(w, rw + w_off)
        out.append(image_ids((rh + 1) // PATCH, (rw + 1) // PATCH, index,
                             (h_off + 1) // PATCH, (w_off + 1) // PATCH))
    return out


def _frames(x: torch.Tensor) -> torch.Tensor:
    """A latent as [B, C, h, w]: 5-D latents must hold one frame (Qwen-Image makes images)."""
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise ValueError(f"Qwen-Image makes images: a latent of {x.shape[2]} frames cannot be denoised")
        return x[:, :, 0]
    return x


class QwenImageFamily(Family):
    name, label = "qwen", "Qwen-Image"
    transformer_class = QwenImageTransformer2DModel
    blocks = QWEN_BLOCKS
    latent_format = WAN21_LATENT  # ComfyUI's QwenImage uses latent_formats.Wan21 (the Wan 2.1 VAE, one frame)
    patch_size = PATCH
    conditioning = ("context",)
    comfy_inputs = {"context": "context", "ref_latents": "ref_latents", "ref_latents_offset": "ref_latents_offset"}
    presets = QWEN_PRESETS
    guided = True          # Qwen-Image runs at cfg 2.5-4 with a negative prompt
    own_processors = True  # ComfyUI's RoPE ids (not diffusers' QwenEmbedRope) reach attention through ours
    extra_tokens = ("ref_latents",)  # Edit: conditioning that adds tokens beyond the latent's grid
    shift_multiplier = AURAFLOW_MULTIPLIER  # a shift node means ModelSamplingAuraFlow's discrete flow

    def __init__(self, complex_rope: bool = True):
        self._rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
        self.complex_rope = complex_rope  # RoPE as complex frequencies (see joint_attention.apply_rope)

    def detect(self, keys):
        return detect_qwen_layout(keys)

    def read_info(self, path):
        return read_qwen_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_qwen_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage, progress=progress)

    def random(self, config, seed=0, dtype=torch.float32, device="cpu", fp8=False, stage=None):
        return real_rope(super().random(config, seed=seed, dtype=dtype, device=device, fp8=fp8, stage=stage))

    def variant(self, config):
        return qwen_variant(config)

    def load_lora(self, path, shapes):
        from .lora import load_qwen_lora

        return load_qwen_lora(path, shapes)

    def model_sampling(self, config, latent_shape, shift=None):
        """ComfyUI's rule: ModelSamplingFlux at 1.15 unless a shift node (ModelSamplingAuraFlow's, as the Qwen-Image
        workflows use: discrete flow, multiplier 1.0) sets one."""
        if shift is None:
            return FluxModelSampling(QWEN_SHIFT)
        return DiscreteFlowModelSampling(shift, multiplier=self.shift_multiplier)

    def check_latent(self, config, latent_shape):
        if len(latent_shape) == 5 and latent_shape[2] != 1:
            raise ValueError(f"Qwen-Image makes images: got a latent of {latent_shape[2]} frames "
                             f"(use EmptySD3LatentImage)")
        c, (h, w) = latent_shape[1], latent_shape[-2:]
        if c != self.latent_format.channels:
            raise ValueError(f"{self.label} latents have {self.latent_format.channels} channels, got {c} "
                             f"(use EmptySD3LatentImage, not EmptyLatentImage)")
        if h % PATCH or w % PATCH:
            raise ValueError(f"a {w * 8}x{h * 8} px image (width x height; latent {w}x{h}) does not split into "
                             f"2x2 patches: {self.label} needs image sizes that are multiples of 16 px")

    def prepare_conditioning(self, config, cond, latent_shape):
        """Edit: the reference latents (VAE space, as the conditioning holds them) to model space, each one's
        frame axis dropped; the method as a string."""
        refs = sorted((k for k in cond if k.startswith("ref_latents.")), key=lambda k: int(k.split(".")[1]))
        method = "offset" if "ref_latents_offset" in cond else "index"
        cond.pop("ref_latents_offset", None)
        if refs:
            fmt = self.latent_format
            latents = [cond.pop(k) for k in refs]
            for r in latents:
                if r.dim() not in (4, 5) or r.shape[1] != fmt.channels or (r.dim() == 5 and r.shape[2] != 1):
                    raise ValueError(f"a reference latent must be one {fmt.channels}-channel image latent; got "
                                     f"shape {tuple(r.shape)}")
            cond["ref_latents"] = [fmt.to_model(_frames(r).float()) for r in latents]
            cond["ref_method"] = method
        return cond

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What ComfyUI's QwenImageTransformer2DModel computes before its blocks."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        x = _frames(x)
        context = cond["context"]
        rows, cols = self.token_grid(tuple(x.shape))
        refs = cond.get("ref_latents") or []
        ids = [image_ids(rows, cols)]
        # the method: prepare_conditioning's (the Sampler path), or the MODEL path's flag
        method = cond.get("ref_method") or ("offset" if "ref_latents_offset" in cond else "index")
        ids += reference_ids(refs, method)
        image_len = sum(len(i) for i in ids)
        start = max(cols // 2, rows // 2)
        txt_ids = torch.arange(start, start + context.shape[1]).float()[:, None].repeat(1, 3)
        cos, sin = self._rope(torch.cat([txt_ids] + ids).to(x.device))
        # complex frequencies in eager mode (as fast as diffusers' own forward: 610 vs 682 ms a batch-2 forward at
        # 1328 px on an H200), diffusers' real form inside compiled blocks (481 vs 492 ms): BENCHMARKS.md
        compiled = getattr(t, "compiled_blocks", False)
        rope = (cos, sin) if compiled or not self.complex_rope else (torch.complex(cos[:, 0::2], sin[:, 0::2]),)
        temb = t.time_text_embed(sigma.float(), torch.empty(0, dtype=dtype, device=x.device))
        step = Step(temb=temb, text_len=context.shape[1], image_len=image_len, rope=rope,
                    extra=dict(image_tokens=rows * cols))
        if embed:
            image = pack(x.to(dtype))
            if refs:
                batch = image.shape[0]
                image = torch.cat([image] + [_batch(pack(pad_to_patches(_frames(r).to(x.device, dtype), PATCH)), batch)
                                             for r in refs], dim=1)
            step.image = t.img_in(image)
            step.text = t.txt_in(t.txt_norm(context.to(dtype)))
        return step

    def run_block(self, block, image, text, step, rope):
        text, image = block(hidden_states=image, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                            temb=step.temb, image_rotary_emb=rope)
        return image, text

    def unpatchify(self, tokens, latent_shape):
        """The image tokens' output (reference tokens follow them and are dropped) -> [B, C, (1,) h, w]."""
        b, c = latent_shape[:2]
        h, w = latent_shape[-2:]
        tokens = tokens[:, :(h // PATCH) * (w // PATCH)]
        x = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(b, c, h, w)
        return x[:, :, None] if len(latent_shape) == 5 else x

    def attention_modules(self, block):
        return [(block.attn, False)]


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"reference latent batch {t.shape[0]} does not divide latent batch {b}")
    return t.repeat(b // t.shape[0], 1, 1)


QWEN = QwenImageFamily()
