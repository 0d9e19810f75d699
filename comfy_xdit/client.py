"""What the ComfyUI nodes call: model/VAE handles and one engine that owns the worker pool.

Plain tensors in and out; nodes.py translates ComfyUI's types. Handles are small immutable
descriptions (file, dtype, GPUs, layout, LoRAs); the workers cache what they load, so a
handle can be used again and again without reloading.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .pool.controller import PoolOptions, RequestFailed, WorkerPool

WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn")  # fp8_e4m3fn: fp8 storage, bf16 compute


@dataclass(frozen=True)
class ModelHandle:
    path: str
    dtype: str = "bf16"
    gpus: int = 1
    parallel: tuple = ()                 # sorted (degree name, value) pairs; empty = auto
    attention_kernel: str | None = None
    loras: tuple = ()                    # ((path, strength), ...) in application order

    def with_lora(self, path: str, strength: float) -> "ModelHandle":
        return replace(self, loras=self.loras + ((path, float(strength)),))

    def load_args(self) -> dict:
        return dict(path=self.path, dtype=self.dtype, parallel=dict(self.parallel) or None,
                    attention_kernel=self.attention_kernel)


@dataclass(frozen=True)
class VaeHandle:
    path: str
    dtype: str = "fp32"
    gpus: int = 1

    def load_args(self) -> dict:
        return dict(kind="vae", path=self.path, dtype=self.dtype)


@dataclass(frozen=True)
class ControlNetHandle:
    path: str


@dataclass
class Control:
    """One applied ControlNet: plain data that travels inside a CONDITIONING."""

    controlnet: ControlNetHandle
    image: torch.Tensor                  # IMAGE [B, H, W, 3] in 0..1
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    vae: VaeHandle | None = None         # InstantX/Union ControlNets take a VAE-encoded image
    mode: int | None = None              # Union control type


@dataclass
class Conditioning:
    context: torch.Tensor                # [B, T, 4096] T5 tokens
    pooled: torch.Tensor                 # [B, 768] CLIP pooled
    guidance: float | None = None
    controls: list = field(default_factory=list)


def available_devices() -> tuple[str, int]:
    """("cuda", n GPUs) or ("cpu", cores) where no GPU is visible (CPU ranks, for tests and trying out)."""
    if os.environ.get("CXD_DEVICE") != "cpu" and torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", os.cpu_count() or 1


@dataclass
class Engine:
    """One pool at a time (all the GPUs it was asked for); resized when a node asks for another count."""

    pool_options: dict = field(default_factory=dict)
    _pool: WorkerPool | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def pool(self, gpus: int) -> WorkerPool:
        device, available = available_devices()
        if gpus < 1 or gpus > available:
            unit = "GPUs" if device == "cuda" else "CPU ranks (no GPU is visible)"
            raise ValueError(f"asked for {gpus} GPUs but {available} {unit} are available; "
                             f"choose between 1 and {available}")
        with self._lock:
            if self._pool is not None and self._pool.options.nproc != gpus:
                self._pool.shutdown()
                self._pool = None
            if self._pool is None:
                self._pool = WorkerPool(PoolOptions(nproc=gpus, device=device, **self.pool_options))
            return self._pool

    def load(self, handle: ModelHandle | VaeHandle) -> dict:
        return self.pool(handle.gpus).request("load_model", handle.load_args())[0]

    def sample(self, model: ModelHandle, positive: Conditioning, negative: Conditioning | None,
               latent: torch.Tensor, seed: int, steps: int, cfg: float = 1.0, sampler_name: str = "euler",
               scheduler: str = "simple", denoise: float = 1.0, noise_mask: torch.Tensor | None = None,
               batch_index: list[int] | None = None, on_progress: Callable | None = None,
               cancel: threading.Event | None = None) -> torch.Tensor:
        key = self.load(model)["model_key"]
        tensors = {"context": positive.context, "pooled": positive.pooled, "latent": latent}
        if cfg != 1.0 and negative is not None:
            tensors.update(negative_context=negative.context, negative_pooled=negative.pooled)
        if noise_mask is not None:
            tensors["noise_mask"] = noise_mask
        controls = []
        for i, c in enumerate(positive.controls):  # applied to both branches, as ControlNetApplyAdvanced does
            tensors[f"control_image_{i}"] = c.image[..., :3]
            controls.append(dict(path=c.controlnet.path, strength=c.strength, start_percent=c.start_percent,
                                 end_percent=c.end_percent, vae_path=c.vae.path if c.vae else None, mode=c.mode))
        args = dict(model_key=key, seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=sampler_name,
                    scheduler=scheduler, denoise=float(denoise), guidance=positive.guidance,
                    batch_index=batch_index, loras=[list(lora) for lora in model.loras], controls=controls)
        _, out = self.pool(model.gpus).request("sample", args, tensors, on_progress=on_progress, cancel=cancel)
        return out["samples"]

    def decode(self, vae: VaeHandle, samples: torch.Tensor) -> torch.Tensor:
        key = self.load(vae)["model_key"]
        return self.pool(vae.gpus).request("decode", {"vae_key": key}, {"samples": samples})[1]["images"]

    def encode(self, vae: VaeHandle, images: torch.Tensor) -> torch.Tensor:
        key = self.load(vae)["model_key"]
        return self.pool(vae.gpus).request("encode", {"vae_key": key}, {"images": images})[1]["samples"]

    def status(self) -> dict | None:
        with self._lock:
            if self._pool is None or not self._pool.alive:
                return None
            return self._pool.request("status")[0]

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


__all__ = ["Conditioning", "Control", "ControlNetHandle", "Engine", "ModelHandle", "RequestFailed", "VaeHandle", "WEIGHT_DTYPES",
           "available_devices"]
