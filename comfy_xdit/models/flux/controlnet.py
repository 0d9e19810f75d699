"""Flux.1 ControlNets (InstantX, Union, XLabs) run under the transformer's sequence split.

Every layout loads into diffusers' FluxControlNetModel: InstantX/Union files are diffusers-keyed;
XLabs files are BFL-keyed, their blocks map through flux_checkpoint's rules and their conv hint
stack is diffusers' ControlNetConditioningEmbedding with 16 channels. Each rank runs the ControlNet
on the image tokens it holds with the transformer's USP attention; the residuals reach the blocks
through the runner's control hook (DiTModel.control; a PipeFusion stage asks for the whole image).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import FluxControlNetModel
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from ..dit import DiTModel, batch_rows
from ..joint_attention import JointAttnProcessor, ShardState
from ...imageops import fit_image
from .family import DEFAULT_GUIDANCE, PATCH, pack_latents
from ..checkpoint import (CheckpointError, assign_state_dict, guess_content, meta_shapes, num_blocks, read_header,
                         read_tensors, stored_dtypes, with_path)
from .checkpoint import _LIN, _rules, rope_axes_for_head_dim

CONTROLNET_EXPECTED = "a Flux ControlNet"

LAYOUTS = ("instantx", "union", "xlabs")
_HINT_CONVS = ["conv_in", *(f"blocks.{i}" for i in range(6)), "conv_out"]  # XLabs input_hint_block.0, .2, ... .14
_SHAPES = {  # where each size is read off, per key family
    "diffusers": dict(x="x_embedder.weight", ctx="context_embedder.weight", cx="controlnet_x_embedder.weight",
                      vec="time_text_embed.text_embedder.linear_1.weight", dbl="transformer_blocks.",
                      sgl="single_transformer_blocks.", guid="time_text_embed.guidance_embedder.linear_1.weight",
                      qn=("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight"),
                      hint="input_hint_block.conv_out.weight"),
    "xlabs": dict(x="img_in.weight", ctx="txt_in.weight", cx="pos_embed_input.weight", vec="vector_in.in_layer.weight",
                  dbl="double_blocks.", sgl="single_blocks.", guid="guidance_in.in_layer.weight",
                  qn=("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"),
                  hint="input_hint_block.14.weight"),
}


@dataclass
class ControlNetInfo:
    path: str
    layout: str          # 'instantx', 'union' or 'xlabs'
    config: dict         # FluxControlNetModel kwargs
    hint: str            # 'latent' (Flux-VAE latent in model space) or 'image' (pixels in [0, 1])
    hint_channels: int   # latent channels (16, 17 with an inpaint mask) or 3 for pixels
    num_mode: int | None
    blocks_repeat: bool  # XLabs residuals cycle over the transformer's blocks; the others cover contiguous runs
    stored_dtypes: set = field(default_factory=set)


def detect_controlnet_layout(keys) -> str:
    """'instantx', 'union' or 'xlabs'; CheckpointError saying what the file seems to be otherwise."""
    ks = set(keys)
    if not ks:
        raise CheckpointError("contains no tensors; expected a Flux ControlNet")
    for key, what in (("controlnet_blocks.0.linear.weight", "a MistoLine Flux ControlNet, which is not supported"),
                      ("pos_embed_input.proj.weight", "an SD3 ControlNet"),
                      ("transformer_blocks.0.img_mlp.net.0.proj.weight", "a Qwen-Image ControlNet"),
                      ("controlnet_cond_embedding.conv_in.weight", "an SD/SDXL ControlNet"),
                      ("zero_convs.0.0.weight", "an SD/SDXL ControlNet"),
                      ("control_model.zero_convs.0.0.weight", "an SD/SDXL ControlNet")):
        if key in ks:
            raise CheckpointError(f"not a supported Flux ControlNet: this looks like {what}")
    if "controlnet_x_embedder.weight" in ks:
        return "union" if "controlnet_mode_embedder.weight" in ks else "instantx"
    if "pos_embed_input.weight" in ks and any(k.startswith("double_blocks.") for k in ks):
        return "xlabs"
    if any(k.startswith(("double_blocks.", "transformer_blocks.", "model.diffusion_model.")) for k in ks):
        raise CheckpointError("is a Flux transformer, not a ControlNet (no 'controlnet_x_embedder' or "
                              "'pos_embed_input' keys); load it as the diffusion model instead")
    raise CheckpointError(f"does not look like a Flux ControlNet: {guess_content(ks)}")


def controlnet_config_from_state_dict(sd, layout) -> dict:
    """FluxControlNetModel kwargs from tensor shapes only (works on meta tensors)."""
    n = _SHAPES["xlabs" if layout == "xlabs" else "diffusers"]
    qn = next((k for k in n["qn"] if k in sd), None)
    missing = [n[k] for k in ("x", "ctx", "cx", "vec") if n[k] not in sd] + ([] if qn else [n["qn"][0]])
    if missing:
        raise CheckpointError(f"missing keys needed to infer the ControlNet size: {missing}")
    inner, in_channels = sd[n["x"]].shape
    head_dim = sd[qn].shape[0]
    if inner % head_dim:
        raise CheckpointError(f"width {inner} is not a multiple of the attention head size {head_dim}")
    keys = list(sd)
    cond = int(sd[n["hint"]].shape[0]) if n["hint"] in sd else None
    if cond is not None and sd[n["cx"]].shape[1] != cond * PATCH * PATCH:
        raise CheckpointError(f"hint embedder takes {sd[n['cx']].shape[1]} channels, expected {cond} x {PATCH}x{PATCH}")
    mode = sd.get("controlnet_mode_embedder.weight")
    return dict(patch_size=PATCH if cond else 1, in_channels=int(in_channels),
                num_layers=num_blocks(keys, n["dbl"]), num_single_layers=num_blocks(keys, n["sgl"]),
                attention_head_dim=int(head_dim), num_attention_heads=int(inner // head_dim),
                joint_attention_dim=int(sd[n["ctx"]].shape[1]), pooled_projection_dim=int(sd[n["vec"]].shape[1]),
                guidance_embeds=n["guid"] in sd, axes_dims_rope=rope_axes_for_head_dim(int(head_dim)),
                num_mode=None if mode is None else int(mode.shape[0]), conditioning_embedding_channels=cond)


def _xlabs_rules(config):
    """(XLabs key, [diffusers keys], op) for every tensor: the transformer's BFL rules without a final layer."""
    r = [x for x in _rules(config["num_layers"], config["num_single_layers"], config["guidance_embeds"])
         if not x[0].startswith("final_layer.")]
    pairs = [(f"controlnet_blocks.{i}",) * 2 for i in range(config["num_layers"])]
    pairs += [(f"controlnet_single_blocks.{i}",) * 2 for i in range(config["num_single_layers"])]
    pairs += [("pos_embed_input", "controlnet_x_embedder")]
    pairs += [(f"input_hint_block.{2 * i}", f"input_hint_block.{c}") for i, c in enumerate(_HINT_CONVS)]
    return r + [(f"{b}.{s}", [f"{d}.{s}"], "copy") for b, d in pairs for s in _LIN]


def xlabs_to_diffusers(sd, config) -> dict:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    rules = _xlabs_rules(config)
    missing = [b for b, _, _ in rules if b not in sd]
    left = sorted(set(sd) - {b for b, _, _ in rules})
    if missing or left:
        raise CheckpointError(f"keys do not fit an XLabs ControlNet with {config['num_layers']}+"
                              f"{config['num_single_layers']} blocks: missing {missing[:5]}, unexpected {left[:5]}")
    out = {}
    for b, ds, op in rules:
        t = sd[b]
        if op == "split":  # fused qkv (and the single blocks' mlp) rows
            sizes = [inner] * 3 + ([t.shape[0] - 3 * inner] if len(ds) == 4 else [])
            if sum(sizes) != t.shape[0] or min(sizes) <= 0:
                raise CheckpointError(f"'{b}' has {t.shape[0]} rows, cannot split into {sizes} (width {inner})")
            out.update(zip(ds, torch.split(t, sizes, dim=0)))
        else:
            out[ds[0]] = t
    return out


def diffusers_to_xlabs(sd, config) -> dict:
    """Exact inverse of xlabs_to_diffusers."""
    return {b: torch.cat([sd[d] for d in ds], dim=0) for b, ds, _ in _xlabs_rules(config)}


def _fits(expected, sd):
    missing, left = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or left:
        raise CheckpointError(f"keys do not fit the inferred ControlNet: missing {missing[:5]}, unexpected {left[:5]}")
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"tensor shapes do not fit the inferred ControlNet config, e.g. {bad[:3]}")


def _build(config, cx_in):
    with torch.device("meta"):  # no weight allocation; the file's tensors are assigned
        model = FluxControlNetModel(**config)
        if cx_in != config["in_channels"]:  # inpainting ControlNets take latent + mask channels
            model.controlnet_x_embedder = torch.nn.Linear(cx_in, model.inner_dim)
    return model


def load_flux_controlnet(path, dtype=torch.bfloat16, device="cpu"):
    """Load a single-file Flux ControlNet; returns (FluxControlNetModel in eval mode, ControlNetInfo)."""
    path = os.fspath(path)
    try:
        header = read_header(path, CONTROLNET_EXPECTED)
        layout = detect_controlnet_layout(header)
        shapes = meta_shapes(header)
        config = controlnet_config_from_state_dict(shapes, layout)
        cx_in = int(shapes[_SHAPES["xlabs" if layout == "xlabs" else "diffusers"]["cx"]].shape[1])
        model = _build(config, cx_in)
        _fits(model.state_dict(), xlabs_to_diffusers(shapes, config) if layout == "xlabs" else shapes)
        sd = read_tensors(path, list(header), dtype=dtype, device=device, expected=CONTROLNET_EXPECTED)
        sd = xlabs_to_diffusers(sd, config) if layout == "xlabs" else sd
    except CheckpointError as e:
        raise with_path(path, e) from e
    model = assign_state_dict(model, sd, path)
    cond = config["conditioning_embedding_channels"]
    info = ControlNetInfo(path=path, layout=layout, config=config, hint="image" if cond else "latent",
                          hint_channels=3 if cond else cx_in // (PATCH * PATCH), num_mode=config["num_mode"],
                          blocks_repeat=layout == "xlabs",
                          stored_dtypes=stored_dtypes(header))
    return model, info


def write_flux_controlnet(model: FluxControlNetModel, path, layout="diffusers", dtype=None):
    """Save as a single file: 'diffusers' (InstantX/Union keys) or 'xlabs' (BFL keys)."""
    from safetensors.torch import save_file

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "xlabs":
        sd = diffusers_to_xlabs(sd, dict(model.config))
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    save_file({k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}, os.fspath(path))
    return path


@torch.no_grad()
def random_flux_controlnet(flux_config: dict, num_layers=1, num_single_layers=1, num_mode=None, xlabs=False,
                           seed=0, dtype=torch.float32, std=None) -> FluxControlNetModel:
    """A ControlNet for a transformer of `flux_config` with random, not zero-initialised, weights (tests, benchmarks)."""
    keys = ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    model = FluxControlNetModel(**{k: flux_config[k] for k in keys}, num_layers=num_layers,
                                num_single_layers=num_single_layers, num_mode=num_mode,
                                patch_size=PATCH if xlabs else 1, conditioning_embedding_channels=16 if xlabs else None)
    std = std or 0.05 * (128 / model.inner_dim) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        if ".norm_" in name:  # RMSNorm scales near 1
            noise = 1 + 2 * noise
        elif name.startswith("input_hint_block") and p.dim() == 4:  # fan-in scaled, so the hint survives 8 convs
            noise *= 1 / std / math.sqrt(p[0].numel())
        p.copy_(noise)
    return torch.nn.Module.to(model, dtype).eval().requires_grad_(False)  # ModelMixin.to warns; nothing stays fp32


@dataclass
class FluxControl:
    """One applied ControlNet, as ComfyUI's ControlNetApplyAdvanced sets it up.

    hint: the control image as a Flux-VAE latent in model space [B, C, h, w] (InstantX/Union),
    or pixels [B, H, W, 3] in [0, 1] (XLabs, ComfyUI's IMAGE). mode: the Union control type
    (None: no mode token, as ComfyUI without SetUnionControlNetType).
    """

    controlnet: FluxControlNetModel
    info: ControlNetInfo
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    mode: int | None = None


class ControlNetRunner:
    """A FluxControl bound to a Flux DiTModel: ControlNet residuals for the image tokens a rank holds."""

    def __init__(self, model: DiTModel, control: FluxControl):
        self.model, self.control, self.cn = model, control, control.controlnet
        info = control.info
        if control.mode is not None and not (info.num_mode and 0 <= control.mode < info.num_mode):
            raise ValueError(f"{info.path}: control mode {control.mode} needs a Union ControlNet with more than "
                             f"{control.mode} modes (this one has {info.num_mode or 0})")
        dtype, device = next(self.cn.parameters()).dtype, next(self.cn.parameters()).device
        if device != model.device:
            raise ValueError(f"ControlNet is on {device}, the model on {model.device}")
        self._state = None
        if model._shard is not None:
            model.mesh.config.validate(num_heads=self.cn.config.num_attention_heads)
            if dtype != model.dtype:  # the USP kernel was picked for the model's dtype
                raise ValueError(f"ControlNet dtype {dtype} differs from the model's {model.dtype}")
            # own state: the ControlNet's text (with a Union mode token) may split where the transformer's does not
            self._state = ShardState(model._shard.attention)
        for m in self.cn.modules():
            if isinstance(m, FluxAttention):
                m.set_processor(JointAttnProcessor(self._state) if self._state else FluxAttnProcessor())

    def _hint_tokens(self, b: int, h: int, w: int) -> torch.Tensor:
        """Packed control tokens for the whole image, [b, h*w/4, C*4]."""
        p = next(self.cn.parameters())
        hint, info = self.control.hint.to(p.device, p.dtype), self.control.info
        if info.hint == "image":
            if hint.dim() != 4 or hint.shape[-1] != 3:
                raise ValueError(f"{info.path}: XLabs ControlNets take an image [B, H, W, 3], got {tuple(hint.shape)}")
            hint = fit_image(hint.movedim(-1, 1), h * 8, w * 8) * 2.0 - 1.0
            hint = self.cn.input_hint_block(hint)
        else:
            if hint.dim() != 4 or hint.shape[-2:] != (h, w):
                raise ValueError(f"{info.path}: control latent {tuple(hint.shape)} does not match the {h}x{w} latent")
            if hint.shape[1] == 16 and info.hint_channels == 17:  # no inpaint mask given: all ones, as ComfyUI
                hint = torch.cat([hint, torch.ones_like(hint[:, :1])], dim=1)
            if hint.shape[1] != info.hint_channels:
                raise ValueError(f"{info.path}: control latent has {hint.shape[1]} channels, "
                                 f"this ControlNet takes {info.hint_channels}")
        return batch_rows(pack_latents(hint), b)

    @torch.inference_mode()
    def prepare(self, context: torch.Tensor, latent_shape: tuple[int, ...]):
        """fn(Step.control, image_index) -> per-block residuals for the image tokens at image_index (a rank's
        shard, or all of them), or None when inactive at this step."""
        b, _, h, w = latent_shape
        p = next(self.cn.parameters())
        tokens = self._hint_tokens(b, h, w)  # the hint is the same every step: embed it once per run
        sampling = self.model.model_sampling(latent_shape)
        c = self.control
        sigmas = (sampling.percent_to_sigma(c.start_percent), sampling.percent_to_sigma(c.end_percent))
        return functools.partial(self._residuals, tokens, batch_rows(context, b).to(p.device, p.dtype), sigmas)

    def _residuals(self, tokens, context, sigmas, kw, image_index):
        t = kw["timestep"]
        if t[0] > sigmas[0] or t[0] < sigmas[1]:  # ComfyUI's test, on the fp32 sigma
            return None
        cn, c = self.cn, self.control
        hs, img_ids, tokens = kw["hidden_states"][:, image_index], kw["img_ids"][image_index], tokens[:, image_index]
        if hs.shape[1] != tokens.shape[1]:
            raise RuntimeError(f"{tokens.shape[1]} control tokens do not line up with {hs.shape[1]} image tokens")
        dt = next(cn.parameters()).dtype
        hs = cn.x_embedder(hs.to(dt)) + cn.controlnet_x_embedder(tokens)
        guidance = kw.get("guidance")
        if cn.config.guidance_embeds and guidance is None:
            guidance = torch.full((hs.shape[0],), DEFAULT_GUIDANCE, device=hs.device)
        pooled, t = kw["pooled_projections"].to(dt), t.to(dt) * 1000
        temb = (cn.time_text_embed(t, guidance.to(dt) * 1000, pooled) if cn.config.guidance_embeds
                else cn.time_text_embed(t, pooled))
        text = cn.context_embedder(context)
        if c.mode is not None:
            mode = torch.full((text.shape[0], 1), c.mode, dtype=torch.long, device=text.device)
            text = torch.cat([cn.controlnet_mode_embedder(mode), text], dim=1)
        txt_ids = torch.zeros(text.shape[1], 3, device=img_ids.device, dtype=img_ids.dtype)
        if self._state is not None:  # DiTModel's rule: the joint text splits with the image when it divides
            sp, shard = self.model.mesh.sp_degree, self.model.mesh.sp_rank
            split = text.shape[1] % sp == 0
            self._state.replicated_text_len = 0 if split else text.shape[1]
            if split:
                text, txt_ids = text.chunk(sp, dim=1)[shard], txt_ids.chunk(sp, dim=0)[shard]
        rope = cn.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
        double, single = [], []
        for block, out in zip(cn.transformer_blocks, cn.controlnet_blocks):
            text, hs = block(hidden_states=hs, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
            double.append((out(hs) * c.strength).to(self.model.dtype))
        for block, out in zip(cn.single_transformer_blocks, cn.controlnet_single_blocks):
            text, hs = block(hidden_states=hs, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
            single.append((out(hs) * c.strength).to(self.model.dtype))
        tf, cyclic = self.model.transformer, c.info.blocks_repeat
        double = _expand(double, len(tf.transformer_blocks), cyclic) or [None] * len(tf.transformer_blocks)
        single = _expand(single, len(tf.single_transformer_blocks), cyclic) or [None] * len(tf.single_transformer_blocks)
        return double + single  # one entry per block, in block order


def _expand(samples, n, cyclic):
    """One residual per transformer block (ComfyUI's rule): XLabs cycles, the others repeat each in turn."""
    if not samples:
        return None
    run = math.ceil(n / len(samples))
    return [samples[i % len(samples)] if cyclic else samples[i // run] for i in range(n)]


def _sum(lists):
    """Per-block residual lists added up; None entries add nothing."""
    def add(a, b):
        return b if a is None else a if b is None else a + b

    return functools.reduce(lambda a, b: [add(x, y) for x, y in zip(a, b)], lists)


class ControlledFluxModel:
    """A Flux model (DiTModel or its PipeFusion adapter) with ControlNets applied to every denoiser call; the
    rest of the adapter is the model's."""

    def __init__(self, model, controls: Sequence[FluxControl]):
        self.model = model
        # strength 0 adds nothing: ComfyUI's apply node drops the ControlNet then
        self.runners = [ControlNetRunner(model, c) for c in controls if c.strength != 0]

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def denoiser(self, cond: dict, latent_shape: tuple[int, ...]):
        inner = self.model.denoiser(cond, latent_shape)
        if not self.runners:
            return inner
        fns = [r.prepare(cond["context"], latent_shape) for r in self.runners]

        def residuals(kwargs, image_index):
            """Per-block residuals summed over the ControlNets; None when none is active at this step."""
            found = [r for r in (fn(kwargs, image_index) for fn in fns) if r is not None]
            return _sum(found) if found else None

        target = getattr(self.model, "stage", self.model)  # a PipeFusion stage runs its blocks itself

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            target.control = residuals
            try:
                return inner(x, sigma)
            finally:
                target.control = None

        return denoise
