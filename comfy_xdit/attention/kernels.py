"""Attention kernels that return (out, log-sum-exp), the pair a ring merge needs.

Layout in and out is yunchang's: q/k/v/out [batch, seq, heads, head_dim]; lse [batch, heads, seq]
in fp32 (bf16 LSE doubles the ring merge error).
"""

from __future__ import annotations

from typing import Callable

import torch

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]

CUDA_KERNELS = ("cudnn", "flash", "efficient")


def _bhsd(*tensors: torch.Tensor):
    return [t.transpose(1, 2) for t in tensors]


def _cpu(q, k, v, scale, need_lse):
    # TORCH_MATH in yunchang returns a zero LSE on CPU; this op returns the real one.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse


def _cudnn(q, k, v, scale, need_lse):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, need_lse, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _flash(q, k, v, scale, need_lse):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _efficient(q, k, v, scale, need_lse):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, need_lse, 0.0, False, scale=scale)[:2]
    return out, lse


_IMPLS = {"cpu": _cpu, "cudnn": _cudnn, "flash": _flash, "efficient": _efficient}
# cuDNN returns NaN for fp32 without raising (seen on H200, torch 2.11); flash refuses fp32.
_HALF_ONLY = {"cudnn", "flash"}


def get_kernel(name: str) -> Kernel:
    """A yunchang-compatible ring-step kernel: fn(q, k, v, softmax_scale=..., **ignored) -> (out, lse).
    need_lse=False (Ulysses alone, no merge) lets cuDNN and the efficient kernel skip it; lse is then None."""
    if name not in _IMPLS:
        raise ValueError(f"unknown attention kernel {name!r}; choose from {sorted(_IMPLS)}")
    impl = _IMPLS[name]

    def kernel(q, k, v, softmax_scale=None, need_lse=True, **_ignored):
        if name in _HALF_ONLY and q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention kernel {name!r} needs fp16 or bf16, got {q.dtype}; use 'efficient' for fp32")
        out, lse = impl(*_bhsd(q, k, v), softmax_scale, need_lse)
        if not need_lse:
            return out.transpose(1, 2), None
        if lse.dim() == 4:  # cuDNN returns [b, h, s, 1]
            lse = lse.squeeze(-1)
        # The efficient kernel pads the LSE to a multiple of 32 queries; the ring merge needs it exact.
        return out.transpose(1, 2), lse[..., :q.shape[1]].float()

    kernel.__name__ = f"{name}_attention"
    return kernel


def default_kernel_name(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    if device.type != "cuda":
        return "cpu"
    # cuDNN is the fastest for Flux shapes on Hopper (measured: BENCHMARKS.md) but half precision only.
    return "cudnn" if dtype in (torch.float16, torch.bfloat16) else "efficient"
