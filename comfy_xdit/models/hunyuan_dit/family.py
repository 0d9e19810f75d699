"""HunyuanDiT (v1.0 / v1.1 / v1.2) as a model family: diffusers' HunyuanDiT2DModel on ComfyUI's terms.

Each block is self-attention over the image tokens (q/k LayerNorms, 2-D RoPE on q and k; sharded by USP like any
image tokens), cross-attention to the BERT + mT5 text that every rank holds whole (RoPE on q only; the text is
replicated, so USPAttention.cross moves only Q and the output), and an MLP; blocks in the second half first mix
in a long skip. What ComfyUI's HunYuanDiT (comfy/ldm/hydit) computes, and so this does:

- model sampling: ModelSamplingDiscrete with v prediction on the "linear" schedule from 0.00085 to 0.018 (v1.2,
  supported_models.HunyuanDiT) or 0.03 (v1.0 / v1.1: the model with style and image-size conditions,
  HunyuanDiT1); the model sees x / sqrt(sigma^2 + 1) and the nearest table index; SDXL latents;
- text: the BERT states (``context``) and the mT5 states projected to the BERT width, each with its mask;
  ComfyUI has no attention mask: where a mask is 0 among a text's *last* text_len (BERT, 77) / text_len_t5
  (mT5, 256) tokens the state is replaced by the model's learned padding row; earlier tokens of a longer text
  are kept as they are. The time embedding adds the attention-pooled first text_len_t5 raw mT5 states (masked or
  not, as ComfyUI pools them);
- v1.0 / v1.1 also embed image_meta_size [height, width, target height, target width, crop top, crop left] in
  pixels (ComfyUI's default: the latent's size, twice, and no crop) and a style index (ComfyUI: 0);
- positions: ComfyUI's 2-D RoPE of each latent's token grid, fitted into a 32 x 32 base grid (512 px) by
  get_fill_resize_and_crop and sampled at the token count; width half first, pairs adjacent; in the model's dtype;
- long skips: block i > N/2 concatenates the output of block N-1-i; each rank's skips are its own shard's
  tokens, so the skip stack (Step.extra, one per forward) needs nothing under Ulysses / Ring / CFG / dp.
  PipeFusion would need the skips to cross stages, which its pipeline does not carry: refused;
- output: the first in_channels (v) of the learned-sigma channels.
"""

from __future__ import annotations

import functools

import torch
from diffusers import HunyuanDiT2DModel

from ...sampling import DiscreteModelSampling, LatentFormat
from ..family import Family, Step
from ..joint_attention import apply_rope
from .checkpoint import (HUNYUAN_DIT_BLOCKS, META_SIZE, SIZE_FREQ, detect_hunyuan_dit_layout, hunyuan_dit_variant,
                         load_hunyuan_dit_transformer, read_hunyuan_dit_info)
from .random import HUNYUAN_DIT_PRESETS

# ComfyUI's latent_formats.SDXL: 4 channels, scale only
SDXL_LATENT = LatentFormat(channels=4, scale=0.13025)
# ComfyUI's sampling_settings (v prediction, its "linear" schedule): v1.2 / v1.0-v1.1 (style + image size)
SCHEDULES = {False: ("linear", 0.00085, 0.018), True: ("linear", 0.00085, 0.03)}
PATCH = 2
PIXELS = 8            # the VAE's pixels per latent pixel (ComfyUI's image-size defaults count pixels)
ROPE_BASE_PX = 512    # ComfyUI: the RoPE grid is fitted into the token grid of a 512 px image
THETA = 10000.0


@functools.cache
def hunyuan_dit_sampling(style: bool) -> DiscreteModelSampling:
    """ComfyUI's ModelSamplingDiscrete for HunyuanDiT (style: a v1.0 / v1.1 model), built once per process."""
    return DiscreteModelSampling(*SCHEDULES[bool(style)], timesteps=1000, prediction="v")


def fill_resize_and_crop(rows: int, cols: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """ComfyUI's get_fill_resize_and_crop for a square base grid: the (start, stop) corners, in base-grid units, of
    the token grid scaled to fit the base (the longer side fills it, the other rounded and centred; Python's round,
    half to even, as ComfyUI's)."""
    if rows / cols > 1:
        h, w = base, int(round(base / rows * cols))
    else:
        h, w = int(round(base / cols * rows)), base
    top, left = int(round((base - h) / 2.0)), int(round((base - w) / 2.0))
    return (top, left), (top + h, left + w)


def _axis_positions(start: int, stop: int, num: int) -> torch.Tensor:
    """numpy.linspace(start, stop, num, endpoint=False, dtype=float32) as ComfyUI samples it (in float64, then
    cast)."""
    step = (stop - start) / num
    return (torch.arange(num, dtype=torch.float64) * step + start).float()


def _rope_1d(dim: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [S, dim] of positions times dim / 2 frequencies theta^(-2i / dim), each repeated per pair."""
    freqs = 1.0 / (THETA ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angle = torch.outer(pos, freqs).float()
    return angle.cos().repeat_interleave(2, dim=1), angle.sin().repeat_interleave(2, dim=1)


@functools.lru_cache(maxsize=8)
def comfy_rope(head_dim: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """ComfyUI's HunyuanDiT image RoPE (cos, sin) [rows * cols, head_dim] for row-major tokens, in dtype: the
    column coordinate on the first half of each head, the row coordinate on the second."""
    start, stop = fill_resize_and_crop(rows, cols, ROPE_BASE_PX // PIXELS // PATCH)
    pos_h = _axis_positions(start[0], stop[0], rows)
    pos_w = _axis_positions(start[1], stop[1], cols)
    grid_w = pos_w[None, :].expand(rows, cols).reshape(-1)
    grid_h = pos_h[:, None].expand(rows, cols).reshape(-1)
    cos_w, sin_w = _rope_1d(head_dim // 2, grid_w)
    cos_h, sin_h = _rope_1d(head_dim // 2, grid_h)
    cos, sin = torch.cat([cos_w, cos_h], dim=1), torch.cat([sin_w, sin_h], dim=1)
    return cos.to(device, dtype), sin.to(device, dtype)


class HunyuanDiTAttnProcessor:
    """diffusers' HunyuanAttnProcessor2_0 (q/k LayerNorms per head, RoPE on q and, in self-attention, on k; no
    mask) with the attention calls swapped for the sequence-parallel ones: self-attention through
    state.attention (the image tokens are sharded), cross-attention through state.cross (the text, replicated)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **_unused):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported for HunyuanDiT (ComfyUI passes none)")
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(context).unflatten(2, (attn.heads, -1)))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if image_rotary_emb is not None:
            q = apply_rope(q, image_rotary_emb)
            if not cross:
                k = apply_rope(k, image_rotary_emb)
        out = (self.state.cross if cross else self.state.attention)(q, k, v).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _rows(value: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if value.shape[0] == b:
        return value
    if b % value.shape[0]:
        raise ValueError(f"conditioning {name} has {value.shape[0]} rows, which do not divide the batch {b}")
    return value.repeat(b // value.shape[0], *([1] * (value.dim() - 1)))


def _masked(states: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor, name: str) -> torch.Tensor:
    """ComfyUI's rule: among the last len(padding) tokens, those the mask zeroes become the padding rows."""
    n = padding.shape[0]
    if states.shape[1] < n:
        raise ValueError(f"{name} has {states.shape[1]} tokens; this HunyuanDiT takes at least {n} (ComfyUI's text "
                         f"encoder pads to {n})")
    if tuple(mask.shape) != tuple(states.shape[:2]):
        raise ValueError(f"the {name} mask has shape {tuple(mask.shape)}; expected {tuple(states.shape[:2])} (one "
                         "value per token)")
    tail = torch.where(mask[:, -n:, None].bool(), states[:, -n:], padding)
    return torch.cat([states[:, :-n], tail], dim=1) if states.shape[1] > n else tail


class HunyuanDiTFamily(Family):
    name, label = "hunyuan_dit", "HunyuanDiT"
    pipefusion = False  # the long skips would have to cross stages (the pipeline carries one activation a patch)
    transformer_class = HunyuanDiT2DModel
    blocks = HUNYUAN_DIT_BLOCKS
    latent_format = SDXL_LATENT
    patch_size = PATCH
    conditioning = ("context", "text_embedding_mask", "encoder_hidden_states_t5", "text_embedding_mask_t5")
    # model_base.HunyuanDiT's extra_conds as its diffusion model takes them (style: none in ComfyUI, 0)
    comfy_inputs = {"context": "context", "text_embedding_mask": "text_embedding_mask",
                    "encoder_hidden_states_t5": "encoder_hidden_states_t5",
                    "text_embedding_mask_t5": "text_embedding_mask_t5", "image_meta_size": "image_meta_size",
                    "style": "style"}
    presets = HUNYUAN_DIT_PRESETS
    guided = True              # HunyuanDiT runs at cfg 6 with a negative prompt
    cross_attention = True     # text is replicated, never in the sharded sequence
    own_processors = True      # one processor (and kernel) on one rank and many

    def detect(self, keys):
        return detect_hunyuan_dit_layout(keys)

    def read_info(self, path):
        return read_hunyuan_dit_info(path)

    def load(self, path, dtype=torch.bfloat16, device="cpu", fp8=False, stage=None, progress=None):
        return load_hunyuan_dit_transformer(path, dtype=dtype, device=device, fp8=fp8, stage=stage,
                                            progress=progress)

    def variant(self, config):
        return hunyuan_dit_variant(config)

    def width(self, config):
        return config["num_attention_heads"] * config["attention_head_dim"]

    def model_sampling(self, config, latent_shape, shift=None):
        if shift is not None:
            raise ValueError(f"{self.label} samples with discrete DDPM steps (v prediction), which have no shift: "
                             "remove the ModelSampling (xDiT) node for this model")
        return hunyuan_dit_sampling(config["use_style_cond_and_image_meta_size"])

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
        """image_meta_size as [N, 6] for a v1.0 / v1.1 model (from a size micro-condition c_size [[height, width]]
        where no image_meta_size came: ComfyUI's width / height with the target the same, no crop); style as an
        integer [N]; both dropped for v1.2, which has neither. PixArt's aspect ratio is never read."""
        cond.pop("c_ar", None)
        size = cond.pop("c_size", None)
        if not config["use_style_cond_and_image_meta_size"]:
            cond.pop("image_meta_size", None)
            cond.pop("style", None)
            return cond
        meta = cond.get("image_meta_size")
        if meta is None and size is not None:
            size = size.float().reshape(size.shape[0], -1)
            meta = torch.cat([size[:, :2], size[:, :2], torch.zeros(size.shape[0], 2)], dim=1)
        if meta is not None:
            meta = meta.float().reshape(meta.shape[0], -1) if meta.dim() == 2 else meta.float().reshape(1, -1)
            if meta.shape[1] != META_SIZE:
                raise ValueError(f"image_meta_size must be [N, {META_SIZE}] (height, width, target height, target "
                                 f"width, crop top, crop left in pixels), got shape {tuple(meta.shape)}")
            cond["image_meta_size"] = meta
        if cond.get("style") is not None:
            cond["style"] = cond["style"].reshape(-1).long()
        return cond

    def prologue(self, transformer, x, sigma, cond, embed=True) -> Step:
        """What ComfyUI's HunYuanDiT.forward computes before its blocks (x already scaled by c_in)."""
        t, dtype = transformer, next(transformer.parameters()).dtype
        config = t.config
        b, _, h, w = x.shape
        rows, cols = h // PATCH, w // PATCH
        style = config.use_style_cond_and_image_meta_size
        timestep = hunyuan_dit_sampling(style).timestep(sigma.float()).float().to(x.device)
        bert = _rows(cond["context"], b, "context").to(x.device, dtype)
        t5 = _rows(cond["encoder_hidden_states_t5"], b, "encoder_hidden_states_t5").to(x.device, dtype)
        if t5.shape[1] < config.text_len_t5:
            raise ValueError(f"encoder_hidden_states_t5 has {t5.shape[1]} tokens; this HunyuanDiT pools the first "
                             f"{config.text_len_t5} (ComfyUI's mT5 encoder pads to {config.text_len_t5})")
        te = t.time_extra_emb
        temb = te.timestep_embedder(te.time_proj(timestep).to(dtype))
        extra = [te.pooler(t5[:, :config.text_len_t5])]
        if style:
            meta = cond.get("image_meta_size")
            if meta is None:  # ComfyUI's default: the latent's size in pixels, the same target, no crop
                meta = torch.tensor([[h * PIXELS, w * PIXELS, h * PIXELS, w * PIXELS, 0, 0]], dtype=dtype)
            meta = _rows(meta, b, "image_meta_size").to(x.device, dtype)
            extra.append(te.size_proj(meta.reshape(-1)).to(dtype).reshape(-1, META_SIZE * SIZE_FREQ))
            index = cond.get("style")
            index = torch.zeros(b, dtype=torch.long) if index is None else _rows(index.reshape(-1), b, "style")
            extra.append(te.style_embedder(index.to(x.device, torch.long)).to(dtype))
        temb = temb + te.extra_embedder(torch.cat(extra, dim=1))
        padding = t.text_embedding_padding.to(dtype)
        mask = _rows(cond["text_embedding_mask"], b, "text_embedding_mask").to(x.device)
        mask_t5 = _rows(cond["text_embedding_mask_t5"], b, "text_embedding_mask_t5").to(x.device)
        text = torch.cat([_masked(bert, mask, padding[:config.text_len], "context"),
                          _masked(t.text_embedder(t5), mask_t5, padding[config.text_len:], "encoder_hidden_states_t5")],
                         dim=1)
        rope = comfy_rope(config.attention_head_dim, rows, cols, dtype, x.device)
        blocks = self.blocks.blocks(t)
        step = Step(temb=temb, text_len=text.shape[1], image_len=rows * cols, text=text, rope=rope,
                    extra=dict(skips=[], next=0, layers=len(blocks),
                               index={id(block): i for i, block in enumerate(blocks)}))
        if embed:
            step.image = t.pos_embed(x.to(dtype))
        return step

    def run_block(self, block, image, text, step, rope):
        """One block with its long skip: blocks i < N/2 - 1 push their output, blocks i > N/2 pop the latest
        (block N-1-i's), as ComfyUI's and diffusers' forwards do; blocks must run in order from the first."""
        extra = step.extra
        i, n = extra["index"].get(id(block)), extra["layers"]
        if i != extra["next"]:
            raise RuntimeError(f"HunyuanDiT block {i} ran after block {extra['next'] - 1}: its long skips need every "
                               "block of a forward in order, on one stage")
        skip = extra["skips"].pop() if i > n // 2 else None
        image = block(image, encoder_hidden_states=text, temb=step.temb, image_rotary_emb=rope, skip=skip)
        if i < n // 2 - 1:
            extra["skips"].append(image)
        extra["next"] = i + 1
        return image, text

    def head(self, transformer, image, step):
        """The final adaptive norm and projection per token, keeping the v channels (the first in_channels of each
        patch pixel's learned-sigma channels)."""
        t = transformer
        out = t.proj_out(t.norm_out(image, step.temb))
        c = t.config.in_channels
        if t.out_channels == c:
            return out
        return out.unflatten(-1, (PATCH * PATCH, t.out_channels))[..., :c].flatten(-2)

    def unpatchify(self, tokens, latent_shape):
        """[B, S, p * p * C] row-major tokens (each patch pixel's channels fastest) -> [B, C, h, w]."""
        b, c, h, w = latent_shape
        x = tokens.reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def attention_modules(self, block):
        return [(block.attn1, False), (block.attn2, False)]

    def processor(self, state, image_only=False):
        return HunyuanDiTAttnProcessor(state)


HUNYUAN_DIT = HunyuanDiTFamily()
