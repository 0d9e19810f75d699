"""Patch-parallel VAE decode/encode for diffusers' AutoencoderKL: each rank holds one band of rows.

Bands are cut on latent rows (torch.tensor_split sizes), so at every level of the VAE a band
starts on a multiple of that level's stride: nearest 2x upsampling stays local and the
encoder's stride-2 convolutions split cleanly. Three things cross bands: convolutions take halo
rows from the neighbouring ranks, GroupNorm statistics are summed over the group, and the
mid-block attention sees the whole latent (all-gathered; it is small). The diffusers modules
run unchanged: for the duration of one call, the forward of each conv, GroupNorm, downsampler
and attention module is replaced by a band-aware one that uses the module's own weights (so one
VAE object must not serve another thread during a call).
Results equal ``loader.decode`` / ``loader.encode`` on one device up to float rounding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from comfy_xdit.vae import loader


def band_rows(rows: int, parts: int) -> list[int]:
    """Rows per band as torch.tensor_split cuts them: the first ``rows % parts`` bands get one more."""
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


@dataclass
class _Bands:
    """This rank's place in a split of the latent rows, and the collectives that cross bands."""
    group: dist.ProcessGroup
    rows: list[int]  # latent rows of each rank of the group, top to bottom
    rank: int

    @property
    def start(self) -> int:
        return sum(self.rows[:self.rank])

    def scaled(self, x: torch.Tensor, dim: int = -2) -> list[int]:
        """Every rank's rows at x's resolution (bands keep their latent proportions at every level)."""
        return [r * (x.shape[dim] // self.rows[self.rank]) for r in self.rows]

    def halo(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """x with `top` rows of the band above and `bottom` rows of the band below; zeros past the image edge."""
        up = x.new_zeros(*x.shape[:-2], top, x.shape[-1])
        down = x.new_zeros(*x.shape[:-2], bottom, x.shape[-1])
        above, below, last = self.rank - 1, self.rank + 1, len(self.rows) - 1
        ops = []  # receives posted before sends: no rank blocks on a send nobody listens for yet
        if top and self.rank > 0:
            ops.append(dist.P2POp(dist.irecv, up, group=self.group, group_peer=above))
        if bottom and self.rank < last:
            ops.append(dist.P2POp(dist.irecv, down, group=self.group, group_peer=below))
        if bottom and self.rank > 0:  # the band above needs our first rows as its bottom halo
            ops.append(dist.P2POp(dist.isend, x[..., :bottom, :].contiguous(), group=self.group, group_peer=above))
        if top and self.rank < last:
            ops.append(dist.P2POp(dist.isend, x[..., -top:, :].contiguous(), group=self.group, group_peer=below))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return torch.cat([up, x, down], dim=-2)

    def conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv over the band: the rows its padding would add come from the neighbours instead."""
        (k, _), (s, _), (top, pad_w) = conv.kernel_size, conv.stride, conv.padding
        return F.conv2d(self.halo(x, top, k - s - top), conv.weight, conv.bias, conv.stride, (0, pad_w))

    def group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """torch's GroupNorm with mean and variance taken over every band (two passes, around the global mean)."""
        b, c, groups = x.shape[0], x.shape[1], norm.num_groups
        xg = x.reshape(b, groups, c // groups, -1)  # a view for the contiguous activations of the band path
        parts = [slice(i, i + 4) for i in range(0, groups, 4)]  # a few groups at a time: fp32 temporaries stay small
        sums = xg.sum((2, 3), dtype=torch.float32).double()
        # fp64 across ranks: a group's element count passes 2^24 at 2048 px
        stats = torch.stack([sums, torch.full_like(sums, xg[0, 0].numel())])
        dist.all_reduce(stats, group=self.group)
        mean = (stats[0] / stats[1]).float()
        dev = torch.cat([(xg[:, p].float() - mean[:, p, None, None]).pow_(2).sum((2, 3)) for p in parts], dim=1)
        dev = dev.double()
        dist.all_reduce(dev, group=self.group)
        # folded per channel as torch does it: y = x * scale + shift
        scale = torch.rsqrt((dev / stats[1]).float() + norm.eps)[..., None, None]
        if norm.affine:
            scale = scale * norm.weight.float().view(groups, -1, 1)
        shift = -mean[..., None, None] * scale
        if norm.affine:
            shift = shift + norm.bias.float().view(groups, -1, 1)
        out = torch.empty_like(xg)
        for p in parts:
            out[:, p] = torch.addcmul(shift[:, p], xg[:, p], scale[:, p])
        return out.view(x.shape)

    def gather(self, x: torch.Tensor, rows: list[int], dim: int, dst: int | None = None) -> torch.Tensor | None:
        """Bands of `rows` rows along dim, concatenated: on every rank (dst None) or on group rank dst only."""
        shape = list(x.shape)
        shape[dim] = max(rows) - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(shape)], dim=dim)  # collectives take equal sizes; bands may differ by one
        parts = [torch.empty_like(padded) for _ in rows] if dst is None or dst == self.rank else None
        if dst is None:
            dist.all_gather(parts, padded, group=self.group)
        else:
            dist.gather(padded, parts, group=self.group, group_dst=dst)
        return None if parts is None else torch.cat([p.narrow(dim, 0, r) for p, r in zip(parts, rows)], dim=dim)

    def whole(self, forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """forward on the whole image (all bands gathered); this rank's rows of the result."""
        rows = self.scaled(x)
        out = forward(self.gather(x, rows, dim=-2), *args, **kwargs)
        return out.narrow(-2, sum(rows[:self.rank]), rows[self.rank])


@contextlib.contextmanager
def _band_aware(root: nn.Module, bands: _Bands):
    """Inside the block, root's modules compute on bands; their original forwards come back on exit."""
    patched = []

    def patch(module, forward):
        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def visit(module, name):
        if isinstance(module, Attention):  # its own GroupNorm then sees the whole latent, unpatched
            return patch(module, partial(bands.whole, module.forward))
        if isinstance(module, Downsample2D) and module.use_conv and module.padding == 0 and module.norm is None:
            # diffusers pads (0, 1, 0, 1) then convolves: the bottom pad row is the next band's first row
            return patch(module, lambda x, *a, **k: bands.conv(module.conv, F.pad(x, (0, 1))))
        if isinstance(module, Upsample2D) and (module.use_conv_transpose or not module.interpolate):
            raise NotImplementedError(f"{name}: only nearest-interpolation upsampling splits into bands")
        if isinstance(module, nn.GroupNorm):
            patch(module, partial(bands.group_norm, module))
        elif isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            k, s, p = module.kernel_size[0], module.stride[0], module.padding
            if module.dilation[0] != 1 or module.padding_mode != "zeros" or isinstance(p, str) or k - s - p[0] < 0:
                raise NotImplementedError(f"{name}: a {module} does not split into row bands")
            patch(module, partial(bands.conv, module))
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}")

    try:
        visit(root, type(root).__name__)
        yield
    finally:
        restore_forwards(patched)


def restore_forwards(patched: list) -> None:
    """Undo the band-aware forwards: (module, its own forward or None for the class's), newest first."""
    for module, forward in reversed(patched):
        if forward is None:
            del module.forward
        else:
            module.forward = forward


def _bands(vae, latent_rows: int, group: dist.ProcessGroup | None, what: str) -> _Bands:
    group = group if group is not None else dist.group.WORLD
    ranks = dist.get_world_size(group)
    if latent_rows < ranks:
        raise ValueError(f"{what} has {latent_rows} latent rows, fewer than the {ranks} ranks sharing it: every "
                         "rank needs at least one row; use a smaller group or one device")
    if getattr(vae, "use_tiling", False):  # tiles would be cut from a band, not from the image
        raise ValueError("the patch-parallel VAE does not combine with diffusers' tiling; call vae.disable_tiling()")
    return _Bands(group, band_rows(latent_rows, ranks), dist.get_rank(group))


@torch.no_grad()
def parallel_decode(vae, latent: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """loader.decode split into row bands over `group` (default: the world); every rank passes the whole latent.

    Returns the IMAGE [B, 8h, 8w, 3] on the group's rank 0, on the latent's device; None on the other ranks."""
    if latent.ndim != 4:
        raise ValueError(f"latent of shape {tuple(latent.shape)} is not a latent [B, C, h, w]")
    bands = _bands(vae, latent.shape[-2], group, f"latent of shape {tuple(latent.shape)}")
    device = next(vae.parameters()).device  # collectives run where the VAE is
    band = latent.narrow(-2, bands.start, bands.rows[bands.rank]).to(device)
    with _band_aware(vae.decoder, bands):
        image = loader.decode(vae, band)
    image = bands.gather(image, bands.scaled(image, dim=1), dim=1, dst=0)
    return None if image is None else image.to(latent.device)


@torch.no_grad()
def parallel_encode(vae, image: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """loader.encode split into row bands over `group` (default: the world); every rank passes the whole IMAGE.

    Returns the latent mean [B, C, H/8, W/8] on the group's rank 0, on the image's device; None on the others."""
    ratio = loader._spatial_ratio(vae)
    if image.ndim != 4 or image.shape[1] < ratio:  # loader.encode checks the rest on each band, alike on every rank
        raise ValueError(f"image of shape {tuple(image.shape)} is not an IMAGE [B, H, W, C] with H >= {ratio}")
    bands = _bands(vae, image.shape[1] // ratio, group, f"image of shape {tuple(image.shape)}")
    top = (image.shape[1] % ratio) // 2  # ComfyUI's center crop; loader.encode crops the width itself
    band = image.narrow(1, top + bands.start * ratio, bands.rows[bands.rank] * ratio)
    device = next(vae.parameters()).device
    with _band_aware(vae.encoder, bands):
        latent = loader.encode(vae, band.to(device))
    latent = bands.gather(latent, bands.rows, dim=-2, dst=0)
    return None if latent is None else latent.to(image.device)


def estimate_decode_bytes(vae_config, latent_shape, ranks: int, dtype: torch.dtype = torch.float32) -> int:
    """Rough peak activation bytes on the busiest rank of parallel_decode (rank 0: it also holds the IMAGE).

    Weights are not included. Assumes a fused attention kernel (no h*w x h*w score matrix)."""
    b, _, h, w = latent_shape
    channels = list(reversed(vae_config["block_out_channels"]))  # decoder order; up block i works at 2**i x
    elem = torch.empty((), dtype=dtype).element_size()
    rows = -(-h // ranks) + 2  # the largest band and its halo
    peak = 4 * channels[0] * h * w  # mid-block attention: gathered latent, q, k, v
    for level, c in enumerate(channels):
        area = rows * w * 4 ** level
        widest = max(c, channels[level - 1] if level else c)  # a block's first resnet still has the wider input
        # resnet: residual, input, halo copy, conv output, cuDNN workspace (H200 bf16: ~10% above measured)
        peak = max(peak, 6 * widest * area)
        if level + 1 < len(channels):
            peak = max(peak, 13 * c * area)  # upsampler: input, then 2x2 larger interpolated, halo copy, conv out
    scale = 2 ** (len(channels) - 1)
    image = 2 * 3 * (h * scale) * (w * scale) * 4  # fp32 IMAGE bands and their concatenation on rank 0
    return b * (peak * elem + image)


def check_decode_fits(vae_config, latent_shape, ranks: int, dtype: torch.dtype, free_bytes: int,
                      device: str = "cuda:0") -> None:
    """Refuse a decode that would not fit, saying how much it needs (the estimate runs ~10% high)."""
    need = estimate_decode_bytes(vae_config, latent_shape, ranks, dtype)
    if need > free_bytes:
        _, _, h, w = latent_shape
        more = next((n for n in range(ranks + 1, 8 * ranks + 1)
                     if estimate_decode_bytes(vae_config, latent_shape, n, dtype) <= free_bytes), None)
        hint = f"; it would fit on {more} GPUs" if more else "; use fewer pixels"
        raise MemoryError(f"decoding {w * 8}x{h * 8} px needs about {need / 2**30:.1f} GB per GPU on {ranks} GPU(s); "
                          f"{free_bytes / 2**30:.1f} GB free on {device}{hint}")
