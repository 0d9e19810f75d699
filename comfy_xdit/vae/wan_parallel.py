"""Patch-parallel decode/encode for the Wan video VAEs (diffusers' AutoencoderKLWan): each rank holds a band of rows.

As for the 2-D VAE (vae/parallel.py, whose _Bands this reuses), bands are cut on latent rows, so at every level a
band starts on a multiple of that level's stride and covers whole 2x2 blocks: nearest upsampling, Wan 2.2's
patchify / unpatchify, AvgDown3D and DupUp3D (pixel blocks folded into channels and back) and WanRMS_norm (an L2
norm over channels at each position) all stay local. What crosses bands:

- every conv with a spatial kernel (WanCausalConv3d 3x3x3, the resamplers' 3x3 Conv2d) takes halo rows from the
  neighbours. A causal conv first puts the cached frames of the previous chunk in front of its input (each rank
  caches its own band's input, exactly the rows the one-device cache holds there) and pads time, then swaps
  halos, so the halo rows carry the neighbours' cached frames too and match the one-device input;
- the downsamplers' ZeroPad2d pads only the width: their bottom row is the next band's first row (zeros below
  the image), as a halo of the stride-2 conv;
- the mid-block attention (one head over all h x w positions of each frame) sees the whole latent, gathered.

Temporal convs (time_conv, the 1x1x1 shortcut and quant convs) are local. Every rank runs the same chunks
(frame by frame in decode, 1, 4, 4... frames in encode) in the same order, so the collectives line up. For one
call the forward of each such module is replaced by a band-aware one using the module's own weights and
restored after (one VAE object must not serve another thread meanwhile).
Results equal ``wan.decode`` / ``wan.encode`` on one device up to float rounding.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from comfy_xdit.vae import wan
from comfy_xdit.vae.parallel import _bands, _Bands, restore_forwards


def _causal_conv(bands: _Bands, conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """WanCausalConv3d.forward over a band: cached frames and time padding first, then the halo rows, then the conv."""
    left, right, top, bottom, front, back = conv._padding
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    x = F.pad(x, (left, right, 0, 0, front, back))
    x = bands.halo(x, top, conv.kernel_size[1] - conv.stride[1] - top)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _check_conv(name: str, conv) -> None:
    padding = conv._padding if hasattr(conv, "_padding") else (conv.padding[1], conv.padding[1], conv.padding[0])
    if isinstance(conv.padding, str) or conv.dilation[-2] != 1 or conv.padding_mode != "zeros" or \
            conv.kernel_size[-2] - conv.stride[-2] - padding[2] < 0:
        raise NotImplementedError(f"{name}: a {conv} does not split into row bands")


@contextlib.contextmanager
def _band_aware(vae: nn.Module, bands: _Bands):
    """Inside the block, the VAE's modules compute on bands; their original forwards come back on exit."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (WanAttentionBlock, WanCausalConv3d, WanResample,
                                                                  WanUpsample)

    patched = []

    def patch(module, forward):
        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    try:
        for name, module in vae.named_modules():
            if isinstance(module, WanAttentionBlock):  # its own norm and convs then see the whole latent, unpatched
                patch(module, partial(bands.whole, module.forward))
            elif isinstance(module, WanResample) and module.mode.startswith("downsample"):
                pad, conv = module.resample  # ZeroPad2d((0, 1, 0, 1)), Conv2d(3, stride 2): the pad row comes below
                if tuple(pad.padding) != (0, 1, 0, 1) or conv.padding != (0, 0):
                    raise NotImplementedError(f"{name}: a {module.resample} does not split into row bands")
                patch(pad, lambda x: F.pad(x, (0, 1)))
            elif isinstance(module, WanUpsample) and module.mode not in ("nearest", "nearest-exact"):
                raise NotImplementedError(f"{name}: only nearest upsampling splits into bands")
            elif isinstance(module, WanCausalConv3d) and module.kernel_size[1] > 1:
                _check_conv(name, module)
                patch(module, partial(_causal_conv, bands, module))
            elif isinstance(module, nn.Conv2d) and not isinstance(module, nn.Conv3d) and module.kernel_size[0] > 1:
                _check_conv(name, module)  # the resamplers' 3x3 convs, on [B * T, C, h, w]
                patch(module, partial(bands.conv, module))
        yield
    finally:
        restore_forwards(patched)


@torch.no_grad()
def parallel_decode(vae, latent: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """wan.decode split into row bands over `group` (default: the world); every rank passes the whole latent.

    Returns the IMAGE [B * F, H, W, 3] (F = 1 + 4 (T - 1)) on the group's rank 0, on the latent's device; None on
    the other ranks."""
    if latent.ndim != 5:
        raise ValueError(f"latent of shape {tuple(latent.shape)} is not a video latent [B, C, T, h, w]")
    bands = _bands(vae, wan.latent_rows(latent.shape), group, f"latent of shape {tuple(latent.shape)}")
    device = next(vae.parameters()).device  # collectives run where the VAE is
    band = latent.narrow(-2, bands.start, bands.rows[bands.rank]).to(device)
    with _band_aware(vae, bands):
        image = wan.decode(vae, band)
    image = bands.gather(image, bands.scaled(image, dim=1), dim=1, dst=0)
    return None if image is None else image.to(latent.device)


@torch.no_grad()
def parallel_encode(vae, image: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """wan.encode split into row bands over `group` (default: the world); every rank passes the whole IMAGE
    [F, H, W, C] (one video's frames).

    Returns the latent mean [1, C, 1 + (F - 1) // 4, H / r, W / r] on the group's rank 0, on the image's device;
    None on the others."""
    r = wan.spatial_ratio(vae)
    if image.ndim != 4 or image.shape[1] < r:  # wan.encode checks the rest on each band, alike on every rank
        raise ValueError(f"image of shape {tuple(image.shape)} is not an IMAGE [F, H, W, C] with H >= {r}")
    bands = _bands(vae, image.shape[1] // r, group, f"image of shape {tuple(image.shape)}")
    top = (image.shape[1] % r) // 2  # ComfyUI's center crop; wan.encode crops the width itself
    band = image.narrow(1, top + bands.start * r, bands.rows[bands.rank] * r)
    device = next(vae.parameters()).device
    with _band_aware(vae, bands):
        latent = wan.encode(vae, band.to(device))
    latent = bands.gather(latent, bands.rows, dim=-2, dst=0)
    return None if latent is None else latent.to(image.device)


def encode_latent_rows(vae_or_ratio, image_shape) -> int:
    """Latent rows an IMAGE [F, H, W, C] encodes to (H // spatial ratio): what parallel_encode splits."""
    r = vae_or_ratio if isinstance(vae_or_ratio, int) else wan.spatial_ratio(vae_or_ratio)
    return int(image_shape[1]) // r


# --- memory ----------------------------------------------------------------------------------------------------

def estimate_decode_bytes(vae_config, latent_shape, ranks: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak bytes on the busiest rank of parallel_decode (rank 0: it also gathers the IMAGE); weights excluded.

    Per level of the decoder (latent resolution first): the band's rows plus halo, the frames one chunk carries
    there (1, then doubled by each temporal upsampler), a resnet's working set (input, shortcut, norm output, the
    cached frames in front, the padded halo copy, conv output), and the causal caches every conv keeps (two
    frames of its input, held across chunks). Then the decoded video: the chunks concatenated, and the fp32 IMAGE."""
    b, _, t, h, w = latent_shape
    cfg = dict(vae_config)
    mult, nrb = list(cfg["dim_mult"]), int(cfg["num_res_blocks"])
    dec = int(cfg.get("decoder_base_dim") or cfg["base_dim"])
    patch = int(cfg.get("patch_size") or 1)
    ups = list(reversed(cfg["temperal_downsample"]))  # the decoder's temporal upsamplers
    channels = [dec * m for m in [mult[-1]] + mult[::-1]][1:]  # out width of each up level
    elem = torch.empty((), dtype=dtype).element_size()
    rows = -(-h // ranks) + 2  # the largest band and its halo
    frames, cache, peak = 1, 0, 4 * dec * mult[-1] * h * w  # mid attention: the gathered latent, q, k, v
    for level, c in enumerate(channels):
        area = rows * w * 4 ** level
        widest = max(c, channels[level - 1] if level else dec * mult[-1])
        cache += 2 * widest * area * (2 * (nrb + 1) + 1)  # two frames of every 3x3x3 conv's input at this level
        peak = max(peak, widest * area * (3 * frames + 3 * (frames + 2)))
        if level + 1 < len(channels):
            up_frames = frames * (2 if ups[level] else 1)
            peak = max(peak, c * area * (frames + 2 * up_frames + 4 * 4 * up_frames))  # time_conv, 2x larger, halo
            frames = up_frames
    scale = 2 ** (len(mult) - 1) * patch
    f = 1 + 4 * (t - 1)
    band_px = -(-h // ranks) * scale * w * scale
    video = 2 * 3 * f * band_px * elem  # decoder output chunks and their concatenation
    image = 2 * 3 * f * (h * scale) * (w * scale) * 4  # fp32 IMAGE bands and the gathered IMAGE on rank 0
    return b * ((peak + cache) * elem + video + image)


def check_decode_fits(vae_config, latent_shape, ranks: int, dtype: torch.dtype, free_bytes: int,
                      device: str = "cuda:0") -> None:
    """Refuse a video decode that would not fit, saying how much it needs and on how many GPUs it would fit."""
    need = estimate_decode_bytes(vae_config, latent_shape, ranks, dtype)
    if need > free_bytes:
        b, _, t, h, w = latent_shape
        scale = 2 ** (len(vae_config["dim_mult"]) - 1) * int(vae_config.get("patch_size") or 1)
        more = next((n for n in range(ranks + 1, min(8 * ranks, h) + 1)
                     if estimate_decode_bytes(vae_config, latent_shape, n, dtype) <= free_bytes), None)
        hint = f"; it would fit on {more} GPUs" if more else "; use fewer frames or pixels"
        raise MemoryError(f"decoding {1 + 4 * (t - 1)} frames of {w * scale}x{h * scale} px needs about "
                          f"{need / 2**30:.1f} GB per GPU on {ranks} GPU(s); {free_bytes / 2**30:.1f} GB free on "
                          f"{device}{hint}")
