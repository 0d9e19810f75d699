"""The Wan 2.1 / Wan 2.2 video VAEs: single files into diffusers' AutoencoderKLWan, ComfyUI's video IMAGE/LATENT.

Accepted layouts, recognised from the keys (never the file name): the original Wan keys that ComfyUI's
``wan_2.1_vae.safetensors`` and ``wan2.2_vae.safetensors`` use (``encoder.conv1``, ``encoder.downsamples.N``,
``decoder.middle.N``, ``decoder.upsamples.N``, ``decoder.head.N``, ``conv1`` / ``conv2``; Wan 2.2 nests its
residual blocks as ``downsamples.N.downsamples.M``), optionally under ``first_stage_model.`` or ``vae.``, and
diffusers keys (``encoder.conv_in``, ``encoder.down_blocks``, ``quant_conv``...). The config comes from tensor
shapes only, so reduced-size VAEs load too.

Why not diffusers' ``convert_wan_vae_to_diffusers``: it hard-codes the full-size Wan 2.1 decoder (4 levels of
2 + 1 residual blocks: it maps ``decoder.upsamples.{0,1,2}``, ``{4,5,6}``... by fixed index and passes other
indices through unchanged) and knows nothing of Wan 2.2's nested blocks (``upsamples.0.upsamples.M`` all land on
``up_blocks.0.resnets.0``, ``downsamples.N.downsamples.M`` keep a ``downsamples`` name the model lacks). So
``wan_key`` names every module of the model built from the file's shapes, for any depth and either version;
tests check that on the full-size Wan 2.1 it agrees with diffusers' converter key for key.

ComfyUI semantics (comfy/sd.py VAE, nodes.py VAEDecode / VAEEncode, comfy/ldm/wan/vae.py / vae2_2.py):
a LATENT holds raw VAE values [B, C, T, h, w]; decoding T latent frames gives F = 1 + 4 (T - 1) frames
(``upscale_ratio = (lambda a: max(0, a * 4 - 3), 8, 8)``, 16 for 2.2) that VAEDecode returns as IMAGE
[B * F, H, W, 3] (frames as the batch); VAEEncode takes an IMAGE [F, H, W, C] as one video [1, C, F, H, W],
center-crops H and W to multiples of the spatial ratio (``vae_encode_crop_pixels``), drops alpha, and the Wan
encoder reads frames in chunks 1, 4, 4...: ``1 + (F - 1) // 4`` latent frames, trailing frames that do not fill
a chunk unused. The encoder's result is the posterior mean.
"""

from __future__ import annotations

import math
import os
import re

import torch

from comfy_xdit.models.checkpoint import (CheckpointError, assign_state_dict, key_sample, meta_shapes, num_blocks,
                                         read_header, read_tensors, stored_dtypes, with_path)
from comfy_xdit.vae.loader import VaeInfo, _strip_prefix

WAN_VAE_EXPECTED = "a Wan VAE checkpoint"
TEMPORAL_CHUNK = 4  # frames per encoder chunk after the first (diffusers' and ComfyUI's Wan encode loops)
_WAN_MARK = "decoder.middle.0.residual.0.gamma"  # ComfyUI's own test for a Wan VAE (comfy/sd.py VAE.__init__)
_DIFFUSERS_MARK = "decoder.mid_block.resnets.0.norm1.gamma"
_RESNET = [("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
           ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut.")]
_TOP = [("encoder.conv_in.", "encoder.conv1."), ("decoder.conv_in.", "decoder.conv1."), ("quant_conv.", "conv1."),
        ("post_quant_conv.", "conv2."), ("encoder.norm_out.", "encoder.head.0."),
        ("decoder.norm_out.", "decoder.head.0."), ("encoder.conv_out.", "encoder.head.2."),
        ("decoder.conv_out.", "decoder.head.2."), ("encoder.mid_block.attentions.0.", "encoder.middle.1."),
        ("decoder.mid_block.attentions.0.", "decoder.middle.1.")]


# --- latent formats ------------------------------------------------------------------------------------------

def wan_latent_format(channels: int):
    """comfy_xdit's LatentFormat for a Wan VAE's latent: ComfyUI's latent_formats.Wan21 (16 channels) or Wan22
    (48); None for other channel counts (reduced test VAEs)."""
    from comfy_xdit.models.wan.family import WAN21_LATENT, WAN22_LATENT

    return {16: WAN21_LATENT, 48: WAN22_LATENT}.get(channels)


def wan_latent_stats(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), float32 [C], as ComfyUI's latent_formats.Wan21 / Wan22 define them; other channel
    counts get zeros and ones (identity)."""
    fmt = wan_latent_format(channels)
    if fmt is None:
        return torch.zeros(channels), torch.ones(channels)
    return torch.tensor(fmt.mean, dtype=torch.float32), torch.tensor(fmt.std, dtype=torch.float32)


# --- keys ----------------------------------------------------------------------------------------------------

def _resnet_key(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def wan_key(key: str, is_residual: bool, num_res_blocks: int) -> str:
    """The original Wan name of a diffusers AutoencoderKLWan key (Wan 2.1 layout, or 2.2's when is_residual)."""
    for new, old in _TOP:
        if key.startswith(new):
            return old + key[len(new):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_key(m[3])}"
    if is_residual:
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
            return f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_resnet_key(m[3])}"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.*)$", key):
            return f"encoder.downsamples.{m[1]}.downsamples.{num_res_blocks}.{m[2]}"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
            return f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_resnet_key(m[3])}"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.*)$", key):
            return f"decoder.upsamples.{m[1]}.upsamples.{num_res_blocks + 1}.{m[2]}"
        return key
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)$", key):  # one flat list in both namings
        resample = m[2].startswith(("resample.", "time_conv."))
        return f"encoder.downsamples.{m[1]}.{m[2] if resample else _resnet_key(m[2])}"
    per_level = num_res_blocks + 2  # decoder: num_res_blocks + 1 residual blocks, then the upsampler
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_resnet_key(m[3])}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)$", key):
        return f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
    return key


def wan_vae_to_original(sd) -> dict:
    """diffusers AutoencoderKLWan keys -> original Wan keys, the structure read off the keys themselves."""
    keys = list(sd)
    is_residual = any(k.startswith("encoder.down_blocks.0.resnets.") for k in keys)
    nrb = num_blocks(keys, "decoder.up_blocks.0.resnets.") - 1
    return {wan_key(k, is_residual, nrb): v for k, v in sd.items()}


def detect_wan_vae_layout(keys) -> str | None:
    """'wan' (original / ComfyUI keys), 'diffusers', or None when the prefix-stripped keys are not a Wan VAE's."""
    keys = set(keys)
    if _WAN_MARK in keys:
        return "wan"
    if _DIFFUSERS_MARK in keys:
        return "diffusers"
    return None


def _levels(sd, is_residual: bool) -> tuple[list[int], list[bool], int]:
    """(output channels of each encoder level, temporal downsampling of each level but the last, resnets per
    level), from original Wan keys."""
    if is_residual:
        n = num_blocks(list(sd), "encoder.downsamples.")
        nrb = num_blocks([k for k in sd if ".residual." in k], "encoder.downsamples.0.downsamples.")
        need = [f"encoder.downsamples.{i}.downsamples.0.residual.2.weight" for i in range(n)]
        _require(sd, need)
        outs = [int(sd[k].shape[0]) for k in need]
        temporal = [f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv.weight" in sd for i in range(n - 1)]
        return outs, temporal, nrb
    flat = num_blocks(list(sd), "encoder.downsamples.")
    outs, temporal, count, counts = [], [], 0, []
    for k in range(flat):
        if f"encoder.downsamples.{k}.resample.1.weight" in sd:  # a level ends
            temporal.append(f"encoder.downsamples.{k}.time_conv.weight" in sd)
            counts.append(count)
            count = 0
        else:
            _require(sd, [f"encoder.downsamples.{k}.residual.2.weight"])
            if count == 0:
                outs.append(int(sd[f"encoder.downsamples.{k}.residual.2.weight"].shape[0]))
            count += 1
    counts.append(count)
    return outs, temporal, counts[0]


def _require(sd, keys) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"missing keys needed to infer the Wan VAE size: {missing[:5]}")


def wan_vae_config_from_state_dict(sd) -> dict:
    """AutoencoderKLWan kwargs from original-Wan-keyed tensor shapes only (works on meta tensors)."""
    _require(sd, ["encoder.conv1.weight", "decoder.conv1.weight", "decoder.head.2.weight", "encoder.head.2.weight",
                  "conv2.weight"])
    is_residual = "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd  # ComfyUI's test for the 2.2 VAE
    base = int(sd["encoder.conv1.weight"].shape[0])
    outs, temporal, nrb = _levels(sd, is_residual)
    if not outs or nrb < 1 or any(o % base for o in outs):
        raise CheckpointError(f"encoder levels with {outs} channels and {nrb} residual blocks do not fit a Wan VAE "
                              f"with base width {base}")
    dim_mult = [o // base for o in outs]
    z_dim = int(sd["conv2.weight"].shape[0])
    if sd["encoder.head.2.weight"].shape[0] != 2 * z_dim:  # mean and log-variance
        raise CheckpointError(f"encoder outputs {sd['encoder.head.2.weight'].shape[0]} channels, expected 2 x {z_dim} "
                              "latent channels; not a Wan VAE")
    dec_last = int(sd["decoder.head.2.weight"].shape[1])
    if dec_last % dim_mult[0]:
        raise CheckpointError(f"decoder output width {dec_last} does not fit the encoder's levels {dim_mult}")
    in_ch, out_ch = int(sd["encoder.conv1.weight"].shape[1]), int(sd["decoder.head.2.weight"].shape[0])
    patch = math.isqrt(in_ch // 3) if in_ch % 3 == 0 else 1  # RGB in patch x patch pixel blocks (2.2: 12 = 3 x 2 x 2)
    patch = patch if patch > 1 and 3 * patch * patch == in_ch else None
    fmt = wan_latent_format(z_dim)
    mean, std = (list(fmt.mean), list(fmt.std)) if fmt else ([0.0] * z_dim, [1.0] * z_dim)
    return dict(base_dim=base, decoder_base_dim=None if dec_last // dim_mult[0] == base else dec_last // dim_mult[0],
                z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=nrb, attn_scales=[], temperal_downsample=temporal,
                dropout=0.0, latents_mean=mean, latents_std=std, is_residual=is_residual,
                in_channels=in_ch, out_channels=out_ch, patch_size=patch, scale_factor_temporal=2 ** sum(temporal),
                scale_factor_spatial=2 ** (len(dim_mult) - 1) * (patch or 1))


def _key_map(model, config) -> dict:
    """{original key: diffusers key} for every tensor of the model."""
    return {wan_key(k, config["is_residual"], config["num_res_blocks"]): k for k in model.state_dict()}


# --- load / write --------------------------------------------------------------------------------------------

def is_wan_vae(keys) -> bool:
    """Whether a file's keys (under one of loader.PREFIXES or none) are a Wan VAE's."""
    keys, prefix = _strip_prefix(list(keys))
    return detect_wan_vae_layout(k[len(prefix):] for k in keys) is not None


def load_wan_vae(path, dtype=torch.float32, device="cpu"):
    """Load a Wan 2.1 / 2.2 VAE file; returns (AutoencoderKLWan in eval mode, loader.VaeInfo)."""
    from diffusers import AutoencoderKLWan

    path = os.fspath(path)
    try:
        header = read_header(path, WAN_VAE_EXPECTED)
        keys, prefix = _strip_prefix(list(header))
        shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
        layout = detect_wan_vae_layout(shapes)
        if layout is None:
            raise CheckpointError(f"does not look like a Wan VAE: no {_WAN_MARK!r} or {_DIFFUSERS_MARK!r} "
                                  f"(found keys like {key_sample(shapes)})")
        original = wan_vae_to_original(shapes) if layout == "diffusers" else shapes
        if len(original) != len(shapes):
            raise CheckpointError("keys of both the original Wan and the diffusers naming")
        config = wan_vae_config_from_state_dict(original)
        with torch.device("meta"):  # no weight allocation; real tensors are assigned below
            model = AutoencoderKLWan(**config)
        expected = model.state_dict()
        to_diff = _key_map(model, config)
        name = (lambda k: to_diff.get(k, k)) if layout == "diffusers" else (lambda k: k)  # the file's naming
        what = (f"a Wan {'2.2' if config['is_residual'] else '2.1'} VAE with base width {config['base_dim']}, levels "
                f"{config['dim_mult']} and {config['num_res_blocks']} residual blocks")
        missing = [name(k) for k in to_diff if k not in original]
        if missing:
            raise CheckpointError(f"{len(missing)} keys missing for {what}, e.g. {missing[:5]}")
        left = sorted(set(original) - set(to_diff))
        if left:
            if layout == "diffusers":  # report in the file's naming
                left = sorted(map(wan_vae_to_original({k: k for k in shapes}).get, left))
            raise CheckpointError(f"{len(left)} unexpected keys for {what}, e.g. {left[:5]}")
        bad = [f"{name(k)}: {tuple(original[k].shape)} != {tuple(expected[d].shape)}"
               for k, d in to_diff.items() if tuple(original[k].shape) != tuple(expected[d].shape)]
        if bad:
            raise CheckpointError(f"tensor shapes do not fit {what}, e.g. {bad[:3]}")
        sd = {k[len(prefix):]: v for k, v in read_tensors(path, keys, dtype=dtype, device=device,
                                                            expected=WAN_VAE_EXPECTED).items()}
        sd = wan_vae_to_original(sd) if layout == "diffusers" else sd
        sd = {d: sd[k] for k, d in to_diff.items()}
    except CheckpointError as e:
        raise with_path(path, e) from e
    model = assign_state_dict(model, sd, path)
    z = config["z_dim"]
    fmt = {16: "wan21", 48: "wan22"}.get(z)
    info = VaeInfo(path=path, layout=layout, config=config, latent_channels=z, latent_format=fmt, scale_factor=1.0,
                   shift_factor=0.0, stored_dtypes=stored_dtypes(header, keys),
                   latents_mean=tuple(config["latents_mean"]), latents_std=tuple(config["latents_std"]), latent_dims=3,
                   temporal_ratio=config["scale_factor_temporal"], spatial_ratio=config["scale_factor_spatial"])
    return model, info


def write_wan_vae_checkpoint(model, path, layout: str = "wan", dtype=None):
    """Save an AutoencoderKLWan as one file: 'wan' (original keys, as ComfyUI's wan_2.1_vae / wan2.2_vae files) or
    'diffusers'."""
    from safetensors.torch import save_file

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "wan":
        back = {d: o for o, d in _key_map(model, model.config).items()}
        sd = {back[k]: v for k, v in sd.items()}
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    # clone: save_file rejects tensors that share storage
    save_file({k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}, os.fspath(path))
    return path


# --- decode / encode -----------------------------------------------------------------------------------------

def spatial_ratio(vae) -> int:
    return 2 ** (len(vae.config.dim_mult) - 1) * (vae.config.patch_size or 1)


def temporal_ratio(vae) -> int:
    return 2 ** sum(vae.config.temperal_downsample)


def decoded_frames(latent_frames: int, ratio: int = 4) -> int:
    """Video frames from latent frames (ComfyUI's upscale_ratio[0] for the Wan VAEs: max(0, 4 t - 3))."""
    return max(0, latent_frames * ratio - (ratio - 1))


def encoded_frames(frames: int, ratio: int = 4) -> int:
    """Latent frames from video frames (ComfyUI's downscale_ratio[0]: floor((F + 3) / 4), = 1 + (F - 1) // 4)."""
    return max(0, (frames + ratio - 1) // ratio)


def latent_rows(shape) -> int:
    """Latent rows of a 4-D [B, C, h, w] or 5-D [B, C, t, h, w] latent (dim -2): what patch-parallel bands split."""
    return int(tuple(shape)[-2])


@torch.no_grad()
def decode(vae, latent):
    """Raw latent [B, C, T, h, w] -> IMAGE float32 [B * F, H, W, 3] in 0..1 with F = 1 + 4 (T - 1), the frames of
    each video in order, on the latent's device (ComfyUI's VAE.decode followed by VAEDecode's reshape)."""
    c = vae.config.z_dim
    if latent.ndim != 5 or latent.shape[1] != c or latent.shape[2] < 1:
        raise ValueError(f"latent of shape {tuple(latent.shape)} does not fit a Wan VAE with {c} latent channels; "
                         f"expected [B, {c}, T, h, w]")
    p = next(vae.parameters())
    x = vae.decode(latent.to(p.device, p.dtype)).sample.to(latent.device).float()  # [B, 3, F, H, W] in -1..1
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
    return x.reshape(-1, *x.shape[-3:])


def _crop(image, r: int):
    """ComfyUI's vae_encode_crop_pixels: H and W center-cropped to multiples of r."""
    for d in (1, 2):
        image = image.narrow(d, (image.shape[d] % r) // 2, image.shape[d] // r * r)
    return image


@torch.no_grad()
def encode(vae, image):
    """IMAGE [F, H, W, C] in 0..1 (the frames of one video as the batch) -> raw latent float32
    [1, C, 1 + (F - 1) // 4, H / r, W / r] (posterior mean; r = 8 for Wan 2.1, 16 for 2.2), on the image's device.

    As ComfyUI: channels past the third (alpha) dropped, H and W center-cropped to multiples of r, and the frames
    past the last whole chunk of four (after the first frame) left out, as the Wan encoder never reads them."""
    r = spatial_ratio(vae)
    if image.ndim != 4 or image.shape[0] < 1 or image.shape[-1] < 3 or image.shape[1] < r or image.shape[2] < r:
        raise ValueError(f"image of shape {tuple(image.shape)} is not an IMAGE [F, H, W, C>=3] with H, W >= {r}")
    image = _crop(image, r)
    frames = 1 + (image.shape[0] - 1) // TEMPORAL_CHUNK * TEMPORAL_CHUNK
    p = next(vae.parameters())
    x = (image[:frames, ..., :3].movedim(-1, 0).unsqueeze(0) * 2.0 - 1.0).to(p.device, p.dtype)  # [1, 3, F, H, W]
    return vae.encode(x).latent_dist.mode().to(image.device).float()
