"""What the ComfyUI nodes call: model/VAE handles and one engine that owns the worker pool.

Plain tensors in and out; nodes.py translates ComfyUI's types. Handles are small immutable
descriptions (file, dtype, GPUs, layout, LoRAs); the workers cache what they load, so a
handle can be used again and again without reloading.

GPUs are numbered as this process's torch numbers them (cuda:i). Before each load, sample,
decode and encode the engine works out how much more memory the pool will take on each of
its GPUs and hands that to its make_room callback (nodes.py asks ComfyUI to free it).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .pool.controller import PoolError, PoolOptions, RequestFailed, WorkerPool
from .stepwise import CACHE_ENTRIES

CONTROL_KEY = "xdit_controls"  # the conditioning key where Apply ControlNet (xDiT) puts its Control entries
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn")  # fp8_e4m3fn: fp8 storage, bf16 compute

GIB = 2 ** 30
# Asked for on top of every amount: the allocator caches more than the peak it allocated, and the
# estimates below are rough.
ROOM_RESERVE = GIB
# Activations per 1024x1024 image until a job has reported its peak. Flux dev's peaks above its
# weights at 2048 px (BENCHMARKS.md): 1.7 GiB on one GPU, 0.9 with Ulysses or Ring 2, up to 9.6 with
# PipeFusion 2 (2.3 per megapixel). Doubled with cfg > 1 on one rank.
ACTIVATIONS_PER_MEGAPIXEL = 3 * GIB
_USUAL_VAE = {"block_out_channels": [128, 256, 512, 512]}  # the SD/SDXL/SD3/Flux VAE decoder's widths


@dataclass(frozen=True)
class ModelHandle:
    path: str
    dtype: str = "bf16"
    gpus: int = 1
    parallel: tuple = ()                 # sorted (degree name, value) pairs; empty = auto
    attention_kernel: str | None = None
    loras: tuple = ()                    # ((path, strength), ...) in application order
    gpu_ids: tuple = ()                  # which GPUs (cuda:i here), as many as `gpus`; empty = the first `gpus`
    pipefusion: tuple = ()               # (("num_pipeline_patch", n), ("warmup_steps", w)); empty = defaults
    compile: bool = False                # torch.compile each transformer block in the workers
    shift: float | None = None           # a ModelSampling* node's shift (None: the family's own rule)

    def with_lora(self, path: str, strength: float) -> "ModelHandle":
        return replace(self, loras=self.loras + ((path, float(strength)),))

    def load_args(self) -> dict:
        return dict(path=self.path, dtype=self.dtype, parallel=dict(self.parallel) or None,
                    attention_kernel=self.attention_kernel, compile=self.compile, **dict(self.pipefusion))


@dataclass(frozen=True)
class VaeHandle:
    path: str
    dtype: str = "fp32"
    gpus: int = 1
    gpu_ids: tuple = ()                  # as ModelHandle.gpu_ids

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
    context: torch.Tensor                # [B, T, D] text tokens (Flux: T5 4096; SD3: CLIP-L/G + T5, 4096; Wan: umt5)
    pooled: torch.Tensor | None = None   # [B, P] pooled text (Flux: CLIP-L 768; SD3: CLIP-L + G, 2048; Wan: none)
    guidance: float | None = None        # FluxGuidance
    controls: list = field(default_factory=list)
    # other named tensors the family reads (Wan I2V: clip_fea, concat_latent_image, concat_mask); which ones a
    # model needs is its family's word, checked in the workers
    extra: dict = field(default_factory=dict)

    def tensors(self, branch: str) -> dict:
        """The named tensors a sample request carries for this branch ('positive' / 'negative')."""
        out = {f"{branch}.context": self.context}
        if self.pooled is not None:
            out[f"{branch}.pooled"] = self.pooled
        if self.guidance is not None:
            out[f"{branch}.guidance"] = torch.tensor([float(self.guidance)])
        out.update({f"{branch}.{name}": t for name, t in self.extra.items()})
        return out


def available_devices() -> tuple[str, int]:
    """("cuda", n GPUs) or ("cpu", cores) where no GPU is visible (CPU ranks, for tests and trying out)."""
    if os.environ.get("CXD_DEVICE") != "cpu" and torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", os.cpu_count() or 1


def check_gpu_ids(gpu_ids: tuple, gpus: int) -> tuple[int, ...]:
    """The GPUs a pool of `gpus` workers runs on: `gpu_ids`, checked, or the first `gpus` when empty."""
    device, available = available_devices()
    unit = "GPUs" if device == "cuda" else "CPU ranks (no GPU is visible)"
    if gpus < 1 or gpus > available:
        raise ValueError(f"asked for {gpus} GPUs but {available} {unit} are available; "
                         f"choose between 1 and {available}")
    if not gpu_ids:
        return tuple(range(gpus))
    shown = ",".join(str(i) for i in gpu_ids)
    if len(gpu_ids) != gpus:
        raise ValueError(f"gpu_ids {shown} names {len(gpu_ids)} GPU(s) but gpus is {gpus}: list {gpus}, "
                         f"or leave gpu_ids empty for GPUs 0 to {gpus - 1}")
    twice = sorted({i for i in gpu_ids if gpu_ids.count(i) > 1})
    if twice:
        raise ValueError(f"gpu_ids {shown} names GPU {twice[0]} twice; each GPU runs one worker")
    missing = [i for i in gpu_ids if not 0 <= i < available]
    if missing:
        raise ValueError(f"gpu_ids {shown}: there is no GPU {missing[0]}; {available} {unit} are available, "
                         f"numbered 0 to {available - 1}")
    return tuple(gpu_ids)


def _physical_gpus(devices: tuple[int, ...]) -> list:
    """The workers' CUDA_VISIBLE_DEVICES for this process's devices: the controller does not pass this
    process's own CUDA_VISIBLE_DEVICES on, so device i becomes entry i of it (a UUID stays a string)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return list(devices)
    return [int(visible[i]) if visible[i].isdigit() else visible[i] for i in devices]


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:  # the pool reports a missing file better
        return 0


def estimate_bytes(kind: str, handle: ModelHandle | VaeHandle, shape: tuple = (), cfg: bool = False,
                   extra_files: tuple = ()) -> int:
    """What one worker holds at the peak of a job, before the job has reported a measured peak.

    Diffusion models: memory.py's estimate from the file's header (see _header_estimate). Where the header cannot
    be read: load: the file's size, divided over PipeFusion stages; sample: that plus
    ACTIVATIONS_PER_MEGAPIXEL per image of the latent `shape` (twice with cfg). extra_files (ControlNets)
    are held whole on every rank.
    decode/encode: the VAE file plus estimate_decode_bytes for the usual VAE at `shape` (a latent; the
    encoder mirrors the decoder)."""
    if isinstance(handle, VaeHandle):
        weights = _file_size(handle.path)
        if kind == "load" or not shape:
            return weights
        from .vae.parallel import estimate_decode_bytes  # diffusers: imported when the first VAE job comes
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(handle.dtype, torch.bfloat16)
        if len(shape) == 5:  # a video latent: roughly its decoded frames as images (the workers check exactly)
            shape = (shape[0] * (1 + 4 * (shape[2] - 1)), shape[1], shape[3], shape[4])
        return weights + estimate_decode_bytes(_USUAL_VAE, shape, handle.gpus, dtype)
    extra = sum(_file_size(p) for p in extra_files)
    estimate = _header_estimate(handle, shape if kind != "load" else (), cfg)
    if estimate is not None:
        return estimate + extra
    stages = dict(handle.parallel).get("pipefusion_degree", 1)
    weights = _file_size(handle.path) // stages + extra
    if kind == "load" or not shape:
        return weights
    batch, h, w = shape[0], shape[-2], shape[-1]
    frames = shape[2] if len(shape) == 5 else 1
    images = batch * frames * h * w * 64 / 2 ** 20  # latent pixels are 8x8 image pixels
    return weights + int(ACTIVATIONS_PER_MEGAPIXEL * images * (2 if cfg else 1))


def _header_estimate(handle: ModelHandle, shape: tuple, cfg: bool) -> int | None:
    """memory.estimate_memory for the handle from its file's header (no tensor read): the weights as the
    handle stores them (fp8, PipeFusion stages) and, with a latent shape, the activations per image (twice
    with cfg on one rank). "auto" is sized as the layout it picks when the model fits (memory.preferred_layout). None
    where the header cannot be read or the layout is invalid: the file-size rule then, the load's own error
    later."""
    from .config import ParallelConfig
    from .memory import estimate_memory, preferred_layout
    from .models.checkpoint import CheckpointError
    from .models.family import read_info

    try:
        family, info = read_info(handle.path)
        config = info.config
        parallel = (ParallelConfig(**dict(handle.parallel)) if handle.parallel else
                    preferred_layout(family, config, handle.gpus))
        # a video latent [B, C, t, h, w] as one image of the same token count: its frames stacked
        image = (shape[-1] * 8, shape[-2] * 8 * (shape[2] if len(shape) == 5 else 1)) if shape else None
        estimate = max(estimate_memory(family, config, parallel, handle.dtype, image), key=lambda e: e.total)
    except (CheckpointError, ValueError, KeyError, TypeError):
        return None
    per_item = 2 if cfg and parallel.cfg_degree == 1 else 1
    return estimate.weights + estimate.activations * (shape[0] if shape else 1) * per_item


@dataclass
class Engine:
    """One pool at a time (all the GPUs it was asked for); restarted when a node asks for other GPUs.

    make_room(amounts): called before each job on a CUDA pool with {device: bytes}, what the pool
    will take on each of its GPUs beyond what it holds there now (see room())."""

    pool_options: dict = field(default_factory=dict)
    make_room: Callable[[dict], None] | None = None
    _pool: WorkerPool | None = None
    _devices: tuple = ()                 # the pool's GPUs, rank order; () on CPU ranks
    _peaks: dict = field(default_factory=dict)  # job -> {device: peak bytes}, as the pool last reported
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _model_keys: dict = field(default_factory=dict)  # handle -> the pool's model key (the stepwise path's calls)
    _sent: tuple = ("", frozenset())     # (pool id, conditioning keys the workers have cached) for forward()

    def pool(self, gpus: int, gpu_ids: tuple = ()) -> WorkerPool:
        devices = check_gpu_ids(tuple(gpu_ids), gpus)
        device = available_devices()[0]
        if device != "cuda":
            devices = ()  # CPU ranks: no GPUs to pick
        with self._lock:
            if self._pool is not None and (self._pool.options.nproc != gpus or set(self._devices) != set(devices)):
                self._pool.shutdown()
                self._pool = None
                self._model_keys.clear()
            if self._pool is None:
                gpu_list = _physical_gpus(devices) if devices else None
                self._pool = WorkerPool(PoolOptions(nproc=gpus, device=device, gpus=gpu_list, **self.pool_options))
                self._devices = devices
            return self._pool

    def room(self, job: tuple, handle: ModelHandle | VaeHandle, estimate: Callable[[], int]) -> dict[int, int]:
        """{device: bytes} the pool is about to take on each of the handle's GPUs for `job`: the peak the
        same job last reported there (it includes the weights), else estimate(), less what the worker
        there holds now (its reserved memory; nothing when the pool is stopped or on other GPUs), plus
        ROOM_RESERVE. {} on CPU ranks."""
        if available_devices()[0] != "cuda":
            return {}
        devices = check_gpu_ids(tuple(handle.gpu_ids), handle.gpus)
        held = {}
        with self._lock:
            if self._pool is not None and set(self._devices) == set(devices):
                try:
                    raw = self.status() or {}
                except PoolError:  # it died: the job restarts it, holding nothing
                    raw = {}
                held = {d: r.get("memory_reserved", 0) for d, r in zip(self._devices, raw.get("ranks") or [])}
            peaks = self._peaks.get(job, {})
        need = peaks if set(devices) <= set(peaks) else dict.fromkeys(devices, estimate())
        return {d: max(0, need[d] - held.get(d, 0)) + ROOM_RESERVE for d in devices}

    def _prepare(self, job: tuple, handle: ModelHandle | VaeHandle, estimate: Callable[[], int]) -> None:
        """Tell make_room what `job` will take, before the pool is touched."""
        if self.make_room is not None:
            amounts = self.room(job, handle, estimate)
            if amounts:
                self.make_room(amounts)

    def _record(self, job: tuple, reply: dict) -> None:
        if reply.get("peak_memory"):  # CUDA pools only; rank i runs on the pool's i-th GPU
            self._peaks[job] = dict(zip(self._devices, reply["peak_memory"]))

    def load(self, handle: ModelHandle | VaeHandle, on_progress: Callable | None = None) -> dict:
        """Load into the workers; on_progress(dict(step=percent, total=100, elapsed), None) while a file is read."""
        self._prepare(("load", handle), handle, lambda: estimate_bytes("load", handle))
        return self._load(handle, on_progress)

    def _load(self, handle: ModelHandle | VaeHandle, on_progress: Callable | None = None) -> dict:
        return self.pool(handle.gpus, handle.gpu_ids).request("load_model", handle.load_args(),
                                                              on_progress=on_progress)[0]

    def sample(self, model: ModelHandle, positive: Conditioning, negative: Conditioning | None,
               latent: torch.Tensor, seed: int, steps: int, cfg: float = 1.0, sampler_name: str = "euler",
               scheduler: str = "simple", denoise: float = 1.0, noise_mask: torch.Tensor | None = None,
               batch_index: list[int] | None = None, on_progress: Callable | None = None,
               cancel: threading.Event | None = None, advanced: dict | None = None) -> torch.Tensor:
        """advanced: KSamplerAdvanced's controls (add_noise, start_step, last_step, force_full_denoise)."""
        guided = cfg != 1.0 and negative is not None
        controls = tuple(c.controlnet.path for c in positive.controls)
        job = ("sample", model, tuple(latent.shape), guided, controls)
        self._prepare(job, model, lambda: estimate_bytes("sample", model, tuple(latent.shape), guided, controls))
        key = self._load(model)["model_key"]  # the room asked for above covers the weights when not resident
        tensors = {"latent": latent, **positive.tensors("positive")}
        if guided:
            tensors.update(negative.tensors("negative"))
        if noise_mask is not None:
            tensors["noise_mask"] = noise_mask
        controls = []
        for i, c in enumerate(positive.controls):  # applied to both branches, as ControlNetApplyAdvanced does
            tensors[f"control_image_{i}"] = c.image[..., :3]
            controls.append(dict(path=c.controlnet.path, strength=c.strength, start_percent=c.start_percent,
                                 end_percent=c.end_percent, vae_path=c.vae.path if c.vae else None, mode=c.mode))
        args = dict(model_key=key, seed=int(seed), steps=int(steps), cfg=float(cfg), sampler_name=sampler_name,
                    scheduler=scheduler, denoise=float(denoise), shift=model.shift,
                    batch_index=batch_index, loras=[list(lora) for lora in model.loras], controls=controls,
                    **(advanced or {}))
        reply, out = self.pool(model.gpus, model.gpu_ids).request("sample", args, tensors, on_progress=on_progress,
                                                                  cancel=cancel)
        self._record(job, reply)
        return out["samples"]

    def forward(self, model: ModelHandle, x: torch.Tensor, timestep: torch.Tensor,
                chunks: list[tuple[str, int, dict]], new_run: bool = False) -> torch.Tensor:
        """One call of the diffusion model by ComfyUI's own sampling (the stepwise path): its raw output for x
        [N, C, h, w] at ComfyUI's timestep [N]. chunks: (key, rows, {ComfyUI keyword: rows' tensor}) in row
        order; a key's tensors travel only the first time (the workers cache them by key, and say when they
        no longer hold one: then they are sent again). new_run: the first call of a sampling run, which asks
        make_room for the job's memory first."""
        if new_run or model not in self._model_keys:
            job = ("sample", model, tuple(x.shape), False, ())
            self._prepare(job, model, lambda: estimate_bytes("sample", model, tuple(x.shape)))
            self._model_keys[model] = self._load(model)["model_key"]
        pool = self.pool(model.gpus, model.gpu_ids)
        args = dict(model_key=self._model_keys[model], chunks=[[key, int(rows)] for key, rows, _ in chunks],
                    loras=[list(lora) for lora in model.loras])
        for resend in (False, True):
            pool_id, cached = self._sent
            cached = set() if resend or pool_id != pool.pool_id else cached
            tensors = {"x": x, "timestep": timestep}
            for i, (key, _, cond) in enumerate(chunks):
                if key not in cached:
                    tensors.update({f"chunk{i}.{name}": t for name, t in cond.items()})
            try:
                _, out = pool.request("forward", args, tensors)
            except RequestFailed as e:
                if e.kind == "cond_missing" and not resend:  # evicted, or the pool restarted
                    continue
                raise
            cached = cached | {key for key, _, _ in chunks}
            self._sent = (pool.pool_id, cached if len(cached) <= 4 * CACHE_ENTRIES else set())
            return out["out"]
        raise AssertionError("unreachable: the resend either returns or raises")

    def decode(self, vae: VaeHandle, samples: torch.Tensor) -> torch.Tensor:
        return self._vae("decode", vae, "samples", samples, tuple(samples.shape))["images"]

    def encode(self, vae: VaeHandle, images: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = images.shape  # the latent it becomes sizes the estimate
        return self._vae("encode", vae, "images", images, (b, 16, h // 8, w // 8))["samples"]

    def _vae(self, kind: str, vae: VaeHandle, name: str, tensor: torch.Tensor, latent_shape: tuple) -> dict:
        job = (kind, vae, tuple(tensor.shape))
        self._prepare(job, vae, lambda: estimate_bytes(kind, vae, latent_shape))
        key = self._load(vae)["model_key"]
        reply, out = self.pool(vae.gpus, vae.gpu_ids).request(kind, {"vae_key": key}, {name: tensor})
        self._record(job, reply)
        return out

    def status(self) -> dict | None:
        with self._lock:
            if self._pool is None or not self._pool.alive:
                return None
            return self._pool.request("status")[0]

    def current_pool(self) -> WorkerPool | None:
        """The pool this engine holds, running or dead, or None; never starts one and never waits (the
        status page asks while a request runs)."""
        return self._pool

    @contextlib.contextmanager
    def hold_if_idle(self):
        """True, with the engine and its pool held, where neither is busy; False at once otherwise. For
        the status page, which must never queue behind a whole sampling run. Engine before pool, the
        order the engine's own methods take them."""
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            if self._pool is None:
                yield True
            else:
                with self._pool.hold_if_idle() as idle:
                    yield idle
        finally:
            self._lock.release()

    def unload(self) -> list[str]:
        """Unload every model and VAE from the running pool, which keeps running; the cache keys it
        unloaded, [] where no pool runs (none is started for this)."""
        with self._lock:
            if self._pool is None or not self._pool.alive:
                return []
            return self._pool.request("unload_model", {"model_key": None})[0].get("unloaded", [])

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
                self._model_keys.clear()


__all__ = ["CONTROL_KEY", "Conditioning", "Control", "ControlNetHandle", "Engine", "ModelHandle", "RequestFailed", "VaeHandle", "WEIGHT_DTYPES",
           "available_devices", "check_gpu_ids", "estimate_bytes"]
