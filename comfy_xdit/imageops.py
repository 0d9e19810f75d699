"""Image helpers on plain tensors, as ComfyUI does them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's common_upscale(..., 'nearest-exact', 'center') on [B, C, H, W]: crop to the aspect, then resize."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    old, new = w / h, width / height
    x = round((w - w * (new / old)) / 2) if old > new else 0
    y = round((h - h * (old / new)) / 2) if old < new else 0
    image = image.narrow(-2, y, h - 2 * y).narrow(-1, x, w - 2 * x)
    return F.interpolate(image, size=(height, width), mode="nearest-exact")
