"""What a pool rank does with each request. Every rank runs handle() in lockstep;
validate() runs on rank 0 alone, before a request is relayed, so bad input never reaches
the other ranks."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from comfy_xdit.config import ParallelConfig, ParallelConfigError
from comfy_xdit.mesh import ParallelMesh, build_mesh
from comfy_xdit.memory import (GB, WEIGHT_STORAGE, NotEnoughMemory, auto_layout, block_costs, check_memory,
                               preferred_layout, sample_activations, stage_bounds)
from comfy_xdit.models.checkpoint import CheckpointError
from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.family import all_presets, family_for_preset, read_info
from comfy_xdit.models.lora import LoraError, LoraMerger, model_shapes
from comfy_xdit.imageops import fit_image
from comfy_xdit.pipefusion import PipeFusionOptions
from comfy_xdit.pipefusion.stage import PipeFusionModel, check_pipefusion
from comfy_xdit.sampling import SAMPLERS, SCHEDULERS, sample
from comfy_xdit.stepwise import CondCache, comfy_name, forward_rows, indexed_lists, join_chunks, pad_to_patches
from comfy_xdit.vae import loader as vae_loader
from comfy_xdit.vae.parallel import check_decode_fits, parallel_decode, parallel_encode

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FAULT_INJECTION_ENV = "CXD_ALLOW_FAULT_INJECTION"  # tests only: lets a request make one rank fail


class RequestError(Exception):
    """An error every rank raises at the same point; answered to the controller, the pool lives on."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def device_free_bytes(device: torch.device) -> int:
    """What this process may still allocate on its GPU: the driver's free memory plus this process's
    cached blocks, within its per-process cap (worker/main.py sets it at start-up)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    return max(0, int(min(free + torch.cuda.memory_reserved(device) - allocated, cap - allocated)))


def _percent(progress):
    """fn(done, total) -> progress(step=percent, total=100, elapsed) on each whole percent (a long load's bar)."""
    if progress is None:
        return None
    start, last = time.time(), [-1]

    def report(done: int, total: int) -> None:
        pct = done * 100 // total if total else 100
        if pct != last[0]:
            last[0] = pct
            progress(dict(step=pct, total=100, elapsed=time.time() - start))

    return report


def conditioning(tensors: dict, branch: str) -> dict:
    """A request's conditioning dict for one branch: tensors named '<branch>.<name>' (e.g. positive.context)."""
    prefix = branch + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


class WorkerState:
    def __init__(self, device: torch.device, control: dist.ProcessGroup, pool_dir: str):
        self.device = device
        self.control = control
        self.pool_dir = pool_dir
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.cancel_requested = threading.Event()  # set by rank 0's socket reader
        self.current_request = -1
        self.models: dict[str, DiTModel] = {}
        self.model_storage: dict[str, str] = {}  # model key -> weight_dtype it runs with ("auto" may pick fp8)
        self.mergers: dict[str, LoraMerger] = {}
        self.loras: dict[tuple, object] = {}   # (path, mtime) -> parsed LoRA, so strength changes never re-read
        self.vaes: dict[str, object] = {}
        self.controlnets: dict[str, tuple] = {}
        self.meshes: dict[ParallelConfig, ParallelMesh] = {}
        self.conds = CondCache()  # the stepwise path's conditioning chunks, by the caller's key
        me = dict(rank=self.rank, pid=os.getpid(), host=socket.gethostname(), device=str(device))
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            # the physical GPU: this rank's entry of the CUDA_VISIBLE_DEVICES the controller set
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            gpu = visible[device.index] if device.index < len(visible) else str(device.index)
            me.update(device_name=props.name, gpu_index=int(gpu) if gpu.isdigit() else gpu,
                      memory_total=props.total_memory, **self._memory())
        self.ranks: list[dict] = [None] * self.world_size
        dist.all_gather_object(self.ranks, me, group=control)

    # --- rank 0 only -------------------------------------------------------------------
    def describe(self, refresh: bool = False) -> dict:
        """The pool for the status view. refresh (every rank calls it then): each rank's GPU memory as it is
        now; without, as it was at start-up (rank 0 alone answers the controller's handshake)."""
        if refresh and self.device.type == "cuda":
            memory = [None] * self.world_size
            dist.all_gather_object(memory, self._memory(), group=self.control)
            for info, now in zip(self.ranks, memory):
                info.update(now)
        return dict(world_size=self.world_size, device=self.device.type, ranks=self.ranks,
                    models=[dict(key=k, parallel=m.mesh.config.as_dict(), family=m.family.name, variant=m.variant,
                                 loras=self._lora_names(k))
                            for k, m in self.models.items()],
                    vaes=list(self.vaes))

    def _memory(self) -> dict:
        """This rank's GPU memory: free on the whole device (other processes count, ComfyUI too), and
        allocated and reserved (allocated plus the allocator's cache) by this worker. {} on CPU ranks."""
        if self.device.type != "cuda":
            return {}
        return dict(memory_free=torch.cuda.mem_get_info(self.device)[0],
                    memory_allocated=torch.cuda.memory_allocated(self.device),
                    memory_reserved=torch.cuda.memory_reserved(self.device))

    def _lora_names(self, key: str) -> list:
        merger = self.mergers.get(key)
        return [[os.path.basename(path), strength] for (path, _), _, strength in (merger.current() if merger else [])]

    # request type -> (the check rank 0 runs before relaying it, or None; the method every rank runs). The
    # shell answers "shutdown" itself.
    REQUESTS = {
        "status": (None, "_status"),
        "load_model": ("_check_load", "_load"),
        "unload_model": (None, "_unload_request"),
        "sample": ("_check_sample", "_sample"),
        "forward": ("_check_forward", "_forward"),
        "decode": ("_check_vae", "_decode"),
        "encode": ("_check_vae", "_encode"),
        "shutdown": (None, None),
    }
    # after these the CUDA cache goes back to the driver; not after "forward", one step's call of many
    JOBS = ("sample", "decode", "encode")

    def validate(self, msg: dict, tensors: dict) -> None:
        kind = msg["type"]
        if kind not in self.REQUESTS:
            raise RequestError(f"request type {kind!r} is not supported by this worker yet", kind="unsupported")
        check = self.REQUESTS[kind][0]
        if check is not None:
            getattr(self, check)(kind, msg.get("args", {}), tensors)

    def _check_load(self, _kind: str, args: dict, tensors: dict) -> None:
        _require(args.get("kind", "dit") in ("dit", "vae"), "load_model kind must be 'dit' or 'vae'")
        path, preset = args.get("path"), args.get("random_preset")
        if preset is not None:  # benchmarks: full-size shapes with random weights, no file
            _require(preset in all_presets(), f"random_preset must be one of {sorted(all_presets())}")
        else:
            _require(isinstance(path, str) and os.path.isfile(path), f"model file not found: {path!r}")
        dtypes = DTYPES if args.get("kind") == "vae" else WEIGHT_STORAGE
        _require(args.get("dtype", "bf16") in dtypes, f"dtype must be one of {sorted(dtypes)}")
        blocks = args.get("stage_blocks")
        _require(blocks is None or (isinstance(blocks, list) and all(isinstance(n, int) for n in blocks)),
                 "stage_blocks must be a list of block counts, one per pipeline stage, e.g. [20, 37]")
        if args.get("parallel"):
            try:
                ParallelConfig(**args["parallel"]).validate(world_size=self.world_size)
            except (TypeError, ParallelConfigError) as e:
                raise RequestError(str(e)) from e

    def _check_sample(self, _kind: str, args: dict, tensors: dict) -> None:
        _require(args.get("model_key") in self.models, f"model {args.get('model_key')!r} is not loaded")
        _require("positive.context" in tensors and tensors["positive.context"].dim() == 3,
                 "sample needs a 3-d 'positive.context' tensor")
        _require("latent" in tensors and tensors["latent"].dim() in (4, 5),
                 "sample needs a 'latent' tensor: [B, C, h, w], or [B, C, frames, h, w] for video")
        for name in ("start_step", "last_step"):
            _require(args.get(name) is None or (isinstance(args[name], int) and args[name] >= 0),
                     f"{name} must be a non-negative integer")
        _require(args.get("shift") is None or (isinstance(args["shift"], (int, float)) and args["shift"] > 0),
                 "shift must be a positive number")
        _require(isinstance(args.get("steps"), int) and args["steps"] >= 1, "steps must be a positive integer")
        _require(isinstance(args.get("seed"), int), "seed must be an integer")
        _require(args.get("sampler_name", "euler") in SAMPLERS, f"sampler_name must be one of {list(SAMPLERS)}")
        _require(args.get("scheduler", "simple") in SCHEDULERS, f"scheduler must be one of {list(SCHEDULERS)}")
        _require(0.0 < float(args.get("denoise", 1.0)) <= 1.0, "denoise must be in (0, 1]")
        for path, _strength in args.get("loras") or []:
            _require(os.path.isfile(path), f"LoRA file not found: {path!r}")
        for i, control in enumerate(args.get("controls") or []):
            _require(os.path.isfile(control.get("path", "")), f"ControlNet file not found: {control.get('path')!r}")
            _require(control.get("vae_path") is None or os.path.isfile(control["vae_path"]),
                     f"VAE file not found: {control.get('vae_path')!r}")
            _require(f"control_image_{i}" in tensors, f"ControlNet {i} has no image")
        if args.get("fail_on_rank") is not None:
            _require(os.environ.get(FAULT_INJECTION_ENV) == "1", "fault injection is off")

    def _check_forward(self, _kind: str, args: dict, tensors: dict) -> None:
        """One model call of ComfyUI's sampling: x [N, C, h, w], ComfyUI's timestep [N], and the conditioning
        of each chunk of rows, sent once (tensors 'chunk<i>.<ComfyUI keyword>') and named by its key after."""
        model = self.models.get(args.get("model_key"))
        _require(model is not None, f"model {args.get('model_key')!r} is not loaded")
        _require(model.mesh.config.pipefusion_degree == 1,
                 "a ComfyUI MODEL cannot run a PipeFusion layout (it pipelines across steps, which only the "
                 "Sampler (xDiT) drives): load the model with another strategy for it, or use the Sampler (xDiT)")
        x, t = tensors.get("x"), tensors.get("timestep")
        _require(x is not None and x.dim() >= 4, "forward needs an 'x' tensor [N, C, h, w]")
        _require(t is not None and t.dim() == 1 and t.shape[0] == x.shape[0],
                 "forward needs a 'timestep' tensor with one value per row of x")
        chunks = args.get("chunks")
        _require(isinstance(chunks, list) and chunks and all(isinstance(c, list) and len(c) == 2 for c in chunks),
                 "forward needs chunks: [[key, rows], ...]")
        _require(sum(int(rows) for _, rows in chunks) == x.shape[0], "the chunks' rows must add up to x's rows")
        known = model.family.comfy_inputs
        for i, (key, rows) in enumerate(chunks):
            sent = [name.split(".", 1)[1] for name in tensors if name.startswith(f"chunk{i}.")]
            if not sent and key not in self.conds:
                raise RequestError(f"conditioning {key!r} is not cached", kind="cond_missing")
            unknown = sorted({n.split(".")[0] for n in sent} - set(known))  # list inputs arrive as name.<i>
            _require(not unknown, f"{model.family.label} on the pool takes ComfyUI inputs "
                                  f"{', '.join(sorted(known))}; it cannot use {', '.join(unknown)}")
            for name in sent:
                _require(tensors[f"chunk{i}.{name}"].shape[:1] == (int(rows),),
                         f"conditioning {name} of chunk {i} must have {rows} rows")

    def _check_vae(self, kind: str, args: dict, tensors: dict) -> None:
        _require(args.get("vae_key") in self.vaes, f"VAE {args.get('vae_key')!r} is not loaded")
        info = self.vaes[args["vae_key"]][1]
        # video VAEs decode [B, C, frames, h, w]; IMAGEs are [B (frames), H, W, C] either way
        ndim = 2 + info.latent_dims if kind == "decode" else 4
        name = "samples" if kind == "decode" else "images"
        _require(name in tensors and tensors[name].dim() == ndim, f"{kind} needs a {ndim}-d '{name}' tensor")

    # --- every rank ---------------------------------------------------------------------
    def handle(self, msg: dict, tensors: dict, progress) -> tuple[dict, dict]:
        kind = msg["type"]
        run = self.REQUESTS.get(kind, (None, None))[1]
        if run is None:
            raise RequestError(f"request type {kind!r} is not supported", kind="unsupported")
        try:
            return getattr(self, run)(msg.get("args", {}), tensors, progress)
        finally:
            if kind in self.JOBS and self.device.type == "cuda":  # for ComfyUI's text encoders (~3 ms a job)
                torch.cuda.empty_cache()

    def _status(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        return self.describe(refresh=True), {}

    def _load(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        return (self._load_vae(args) if args.get("kind") == "vae" else self._load_model(args, progress)), {}

    def _unload_request(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        return self._unload(args.get("model_key")), {}

    def _decode(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        return self._vae("decode", args, tensors)

    def _encode(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        return self._vae("encode", args, tensors)

    def _mesh(self, config: ParallelConfig) -> ParallelMesh:
        if config not in self.meshes:
            self.meshes[config] = build_mesh(config, self.device)
        return self.meshes[config]

    def _load_model(self, args: dict, progress=None) -> dict:
        dtype = args.get("dtype", "bf16")
        source = f"random:{args['random_preset']}" if args.get("random_preset") else os.path.abspath(args["path"])
        layout = ",".join(f"{k}={v}" for k, v in sorted((args.get("parallel") or {}).items())) or "auto"
        if layout == "auto" or (args.get("parallel") or {}).get("pipefusion_degree", 1) > 1:  # auto may pick it
            layout += f",patches={args.get('num_pipeline_patch', 2)},warmup={args.get('warmup_steps', 1)}"
            layout += f",stages={args['stage_blocks']}" if args.get("stage_blocks") else ""
        key = f"{source}|{dtype}|{args.get('attention_kernel') or 'default'}|{layout}|compile={bool(args.get('compile'))}"
        if key not in self.models:
            compute, fp8 = WEIGHT_STORAGE[dtype]
            if args.get("random_preset"):
                family = family_for_preset(args["random_preset"])
                config, info = family.preset_config(args["random_preset"]), None
            else:
                try:  # header only: the family, layout, memory check and stage come before any weight is read
                    family, info = read_info(args["path"])
                except CheckpointError as e:  # same file, same verdict on every rank
                    raise RequestError(str(e)) from e
                config = info.config
            heads = family.num_heads(config)
            try:
                if args.get("parallel"):
                    parallel = ParallelConfig(**args["parallel"])
                elif self.device.type == "cuda":  # auto: the fastest layout that fits (fp8 only if none does)
                    parallel, dtype = auto_layout(family, config, self.world_size, dtype, *self._fullest_gpu())
                    compute, fp8 = WEIGHT_STORAGE[dtype]
                else:
                    parallel = preferred_layout(family, config, self.world_size)
                parallel.validate(world_size=self.world_size, num_heads=heads)
            except ParallelConfigError as e:
                raise RequestError(str(e)) from e
            except NotEnoughMemory as e:
                raise RequestError(str(e), kind="memory") from e
            pipefusion = parallel.pipefusion_degree > 1
            mesh, stage = self._mesh(parallel), None
            if pipefusion:  # this rank reads only its stage's blocks
                try:
                    check_pipefusion(family)  # before any weight is read
                    stage_blocks = args.get("stage_blocks")  # blocks per stage, else balanced by parameters
                    options = PipeFusionOptions(num_pipeline_patch=int(args.get("num_pipeline_patch", 2)),
                                                warmup_steps=int(args.get("warmup_steps", 1)),
                                                stage_blocks=tuple(int(n) for n in stage_blocks) if stage_blocks
                                                else None)
                    options.validate(parallel.pipefusion_degree, len(block_costs(family, config)))
                except ValueError as e:
                    raise RequestError(str(e)) from e
                bounds = stage_bounds(family, config, parallel.pipefusion_degree, options.stage_blocks)
                stage = bounds[mesh.rank("pp")]
            if self.device.type == "cuda":
                self._check_memory(family, config, parallel, dtype, bounds if pipefusion else None)
            if info is None:
                transformer = family.random(config, seed=0, dtype=compute, device=self.device, fp8=fp8, stage=stage)
            else:
                try:
                    transformer, info = family.load(args["path"], dtype=compute, device=self.device, fp8=fp8,
                                                    stage=stage, progress=_percent(progress))
                except CheckpointError as e:
                    raise RequestError(str(e)) from e
            model = DiTModel(family, transformer, mesh, args.get("attention_kernel"), info)
            if args.get("compile"):
                model.compile_blocks()
            if pipefusion:
                try:
                    model = PipeFusionModel(model, options)
                except ValueError as e:
                    raise RequestError(str(e)) from e
            self.models[key], self.model_storage[key] = model, dtype
        model = self.models[key]
        return dict(model_key=key, family=model.family.name, variant=model.variant, parallel=model.mesh.config.as_dict(),
                    weight_dtype=self.model_storage[key],
                    config={k: v for k, v in model.config.items() if not k.startswith("_")})

    def _fullest_gpu(self) -> tuple[int, str]:
        """(free bytes, device name) of the rank with the least free memory; every rank gets the same answer."""
        free = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(free, torch.tensor([device_free_bytes(self.device)]), group=self.control)
        fullest = min(range(self.world_size), key=lambda r: int(free[r]))
        return int(free[fullest]), self.ranks[fullest]["device"]

    def _check_memory(self, family, config: dict, parallel: ParallelConfig, dtype: str, bounds=None) -> None:
        """Refuse, before any weight is read, a layout that does not fit the GPU with the least free memory
        (weights plus the activations of one 1024x1024 image)."""
        try:
            check_memory(family, config, parallel, dtype, *self._fullest_gpu(), image_size=(1024, 1024),
                         explicit_bounds=bounds)
        except NotEnoughMemory as e:
            loaded = f" ({len(self.models)} other model(s) loaded: unload them to free memory)" if self.models else ""
            raise RequestError(str(e) + loaded, kind="memory") from e

    def _check_sample_memory(self, key: str, latent_shape: tuple, guided: bool) -> None:
        """Refuse, before the first step, a job whose activations (memory.sample_activations: the real token count
        and batch) exceed what the GPU with the least free memory has left beside the resident weights; the load
        only checked one 1024x1024 image."""
        model = self.models[key]
        stage = model.stage_bounds[model.link.rank] if isinstance(model, PipeFusionModel) else None
        need = sample_activations(model.family, model.config, model.mesh.config, self.model_storage[key],
                                  latent_shape, guided, None if stage is None else stage[1] - stage[0])
        free, device = self._fullest_gpu()
        if need > free:
            b, (h, w) = latent_shape[0], latent_shape[-2:]
            size = f"{latent_shape[2]} frames of " if len(latent_shape) == 5 and latent_shape[2] > 1 else ""
            both = " (cond and uncond on one GPU)" if guided and model.mesh.size("cfg") == 1 else ""
            raise RequestError(f"sampling {b} latent(s) of {size}{w}x{h} needs about {need / GB:.1f} GB per GPU above "
                               f"the weights{both}; {free / GB:.1f} GB free on {device}: use a smaller size or batch, "
                               "more GPUs (cfg_parallel, ulysses), or free memory", kind="memory")

    def _resident_vae(self, path: str, dtype: str) -> tuple[str, tuple]:
        """(key, (vae, info)), loading the file once per dtype."""
        key = f"vae|{os.path.abspath(path)}|{dtype}"
        if key not in self.vaes:
            try:
                self.vaes[key] = vae_loader.load_vae(path, dtype=DTYPES[dtype], device=self.device)
            except CheckpointError as e:
                raise RequestError(str(e)) from e
        return key, self.vaes[key]

    def _load_vae(self, args: dict) -> dict:
        key, (_, info) = self._resident_vae(args["path"], args.get("dtype", "fp32"))
        return dict(model_key=key, latent_channels=info.latent_channels, latent_format=info.latent_format,
                    is_video=info.is_video, spatial_ratio=info.spatial_ratio, temporal_ratio=info.temporal_ratio)

    def _vae(self, kind: str, args: dict, tensors: dict) -> tuple[dict, dict]:
        """Patch-parallel decode/encode: every rank takes a band of latent rows; the result lands on rank 0.

        Image VAEs: latents [B, C, h, w] <-> IMAGE [B, H, W, C]. The Wan video VAEs: latents [B, C, T, h, w] decode
        to IMAGE [B * F, H, W, 3] (F = 1 + 4 (T - 1), frames as the batch), an IMAGE [F, H, W, C] encodes as the
        frames of one video; the rows are dim -2 of the latent either way."""
        from comfy_xdit.vae import wan, wan_parallel

        vae, info = self.vaes[args["vae_key"]]
        if info.is_video:
            fits, run_decode, run_encode = (wan_parallel.check_decode_fits, wan_parallel.parallel_decode,
                                            wan_parallel.parallel_encode)
        else:
            fits, run_decode, run_encode = check_decode_fits, parallel_decode, parallel_encode
        start = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            if kind == "decode":
                samples = tensors["samples"].to(self.device)  # its rank: checked in _check_vae
                _require(samples.shape[1] == info.latent_channels,
                         f"this VAE takes {info.latent_channels}-channel latents, got {samples.shape[1]}")
                if self.device.type == "cuda":  # the smallest free memory of any rank, so all ranks agree
                    try:
                        fits(info.config, tuple(samples.shape), self.world_size, next(vae.parameters()).dtype,
                             *self._fullest_gpu())
                    except MemoryError as e:
                        raise RequestError(str(e), kind="memory") from e
                if wan.latent_rows(samples.shape) >= self.world_size:
                    out = run_decode(vae, samples)
                else:  # fewer latent rows than ranks: one rank decodes it whole
                    out = vae_loader.decode(vae, samples) if self.rank == 0 else None
                name = "images"
            else:
                images = tensors["images"].to(self.device)
                if images.shape[1] // info.spatial_ratio >= self.world_size:
                    out = run_encode(vae, images)
                else:
                    out = vae_loader.encode(vae, images) if self.rank == 0 else None
                name = "samples"
        if self.rank == 0:
            out = out.float().cpu()  # waits for the GPU, so elapsed covers the whole decode
        reply = dict(elapsed=time.time() - start, **self._peak_memory())
        return (reply, {name: out}) if self.rank == 0 else (reply, {})

    def _peak_memory(self) -> dict:
        """{"peak_memory": [bytes per rank]} since the last reset, on CUDA; {} on CPU. Every rank calls it."""
        if self.device.type != "cuda":
            return {}
        peaks = [None] * self.world_size
        dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(self.device), group=self.control)
        return dict(peak_memory=peaks)

    def _apply_loras(self, key: str, loras: list) -> None:
        model = self.models[key]
        if not loras and key not in self.mergers:
            return
        parsed = []
        for path, strength in loras:
            lora_id = (os.path.abspath(path), os.path.getmtime(path))
            if lora_id not in self.loras:
                try:
                    self.loras[lora_id] = model.family.load_lora(path, self._whole_shapes(key))
                except (LoraError, CheckpointError) as e:  # same file, same verdict on every rank
                    raise RequestError(str(e)) from e
            parsed.append((lora_id, self.loras[lora_id], float(strength)))
        if key not in self.mergers:  # a PipeFusion stage merges the patches of its own blocks
            elsewhere = frozenset(self._whole_shapes(key)) - frozenset(model_shapes(model.transformer))
            self.mergers[key] = LoraMerger(model.transformer, elsewhere=elsewhere)
        try:
            self.mergers[key].set_loras(parsed)
        except LoraError as e:  # same LoRAs, same verdict on every rank
            raise RequestError(str(e)) from e

    def _whole_shapes(self, key: str) -> dict:
        """Parameter shapes of the whole transformer, also where this rank holds one PipeFusion stage of it:
        a LoRA is checked against every block, wherever the block lives."""
        model = self.models[key]
        return model_shapes(model.family.meta_model(model.config))

    def _control(self, model, control: dict, image: torch.Tensor, latent_shape: tuple) -> dict:
        """One ControlNet of a request as the family's with_controls takes it: cached per file and dtype;
        hints that are latents are VAE-encoded here."""
        key = f"{os.path.abspath(control['path'])}|{model.dtype}"
        if key not in self.controlnets:
            try:
                self.controlnets[key] = model.family.load_controlnet(control["path"], model.dtype, self.device)
            except CheckpointError as e:
                raise RequestError(str(e)) from e
        controlnet, info = self.controlnets[key]
        _require(image.shape[0] == 1 or model.mesh.size("dp") == 1,
                 "with data parallelism the ControlNet takes one control image for the whole batch")
        hint = image
        if info.hint == "latent":
            _require(control.get("vae_path") is not None,
                     f"{os.path.basename(control['path'])} takes a VAE-encoded control image: connect a VAE to "
                     "Apply ControlNet (xDiT)")
            _, (vae, _) = self._resident_vae(control["vae_path"], "fp32")
            h, w = latent_shape[-2:]
            pixels = fit_image(image.movedim(-1, 1).float(), h * 8, w * 8).movedim(1, -1)
            with torch.inference_mode():
                hint = model.latent_format.to_model(vae_loader.encode(vae, pixels.to(self.device)))
        return dict(controlnet=controlnet, info=info, hint=hint, strength=float(control.get("strength", 1.0)),
                    start_percent=float(control.get("start_percent", 0.0)),
                    end_percent=float(control.get("end_percent", 1.0)), mode=control.get("mode"))

    def _unload(self, key: str | None) -> dict:
        keys = list(self.models) + list(self.vaes) if key is None else [key]
        if any("compile=True" in k for k in keys if k in self.models):
            torch._dynamo.reset()  # compiled graphs of the old model would crowd the recompile limit
        for k in keys:
            self.models.pop(k, None)
            self.model_storage.pop(k, None)
            self.mergers.pop(k, None)
            self.vaes.pop(k, None)
        if key is None:
            self.controlnets.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return dict(unloaded=keys)

    def _step_sync(self, deadline: float | None) -> None:
        """Every rank agrees at each step boundary whether to stop (cancel or deadline)."""
        flags = torch.tensor([int(self.cancel_requested.is_set()),
                              int(deadline is not None and time.time() > deadline)], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        if flags[0]:
            raise RequestError("cancelled", kind="cancelled")
        if flags[1]:
            raise RequestError("deadline passed before the request finished", kind="deadline")

    def _forward(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        """One model call of ComfyUI's own sampler (see comfy_xdit/stepwise.py): the model's raw output for x."""
        start = time.time()
        model = self.models[args["model_key"]]
        names = model.family.comfy_inputs
        chunks = []
        for i, (key, _rows) in enumerate(args["chunks"]):
            sent = {comfy_name(names, n.split(".", 1)[1]): t for n, t in tensors.items()
                    if n.startswith(f"chunk{i}.")}
            if sent:
                self.conds.put(key, {n: t.to(model.device, model.dtype if t.is_floating_point() else t.dtype)
                                     for n, t in sent.items()})
            chunks.append(self.conds.get(key))
        x, (h, w) = pad_to_patches(tensors["x"], model.family.patch_size), tensors["x"].shape[-2:]
        try:
            cond = indexed_lists(join_chunks(chunks))
            model.family.check_latent(model.config, tuple(x.shape))  # any token count: see DiTModel.forward
            model.check_conditioning(cond)
        except ValueError as e:
            raise RequestError(str(e)) from e
        self._apply_loras(args["model_key"], args.get("loras") or [])
        sigma = model.model_sampling(tuple(x.shape)).input_sigma(tensors["timestep"].float()).to(model.device)
        with torch.inference_mode():
            out = forward_rows(model, x.to(model.device, model.dtype), sigma, cond)[..., :h, :w].cpu()  # waits
        return (dict(elapsed=time.time() - start), {"out": out}) if self.rank == 0 else ({}, {})

    def _sample(self, args: dict, tensors: dict, progress) -> tuple[dict, dict]:
        model = self.models[args["model_key"]]
        model.shift = None if args.get("shift") is None else float(args["shift"])  # a ModelSampling* override
        positive, negative = conditioning(tensors, "positive"), conditioning(tensors, "negative") or None
        if model.latent_format.dims == 3 and tensors["latent"].dim() == 4:
            # an image latent for a model of 5-D latents (Qwen-Image, Wan): the frame axis added, as ComfyUI's
            # fix_empty_latent_channels does; the result stays 5-D, as KSampler's
            tensors["latent"] = tensors["latent"].unsqueeze(2)
            if tensors.get("noise_mask") is not None and tensors["noise_mask"].dim() == 4:
                tensors["noise_mask"] = tensors["noise_mask"].unsqueeze(2)
        try:
            model.check_latent(tuple(tensors["latent"].shape))
            for cond in (positive, negative):
                if cond is not None:
                    model.check_conditioning(cond)
        except ValueError as e:
            raise RequestError(str(e)) from e
        if self.device.type == "cuda":
            self._check_sample_memory(args["model_key"], tuple(tensors["latent"].shape),
                                      negative is not None and float(args.get("cfg", 1.0)) != 1.0)
        start, deadline = time.time(), args.get("deadline")
        self._apply_loras(args["model_key"], args.get("loras") or [])
        if args.get("controls"):
            _require(model.mesh.config.pipefusion_degree == 1 or model.mesh.sp_degree == 1,
                     "ControlNets with pipefusion need ring_degree = ulysses_degree = 1 (pipefusion alone, "
                     "or with cfg/data parallel)")
            try:
                model = model.family.with_controls(model, [self._control(model, c, tensors[f"control_image_{i}"],
                                                                         tuple(tensors["latent"].shape))
                                                           for i, c in enumerate(args["controls"])])
            except ValueError as e:
                raise RequestError(str(e)) from e

        def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
            if args.get("fail_on_rank") == self.rank and step == args.get("fail_at_step", 1):
                raise RuntimeError("CUDA out of memory. (injected fault for a test)")
            preview = {"preview": denoised[:1].float().cpu()} if args.get("preview") else None
            progress(dict(step=step, total=total, elapsed=time.time() - start), preview)
            self._step_sync(deadline)

        self._step_sync(deadline)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        samples = sample(model, positive, tensors["latent"], seed=args["seed"], steps=args["steps"],
                         cfg=float(args.get("cfg", 1.0)), negative=negative, batch_index=args.get("batch_index"),
                         callback=on_step, sampler_name=args.get("sampler_name", "euler"),
                         scheduler=args.get("scheduler", "simple"), denoise=float(args.get("denoise", 1.0)),
                         noise_mask=tensors.get("noise_mask"), add_noise=bool(args.get("add_noise", True)),
                         start_step=args.get("start_step"), last_step=args.get("last_step"),
                         force_full_denoise=bool(args.get("force_full_denoise", False)))
        samples = samples.float().cpu()  # waits for the GPU, so elapsed covers the whole denoise
        return dict(elapsed=time.time() - start, **self._peak_memory()), {"samples": samples}
