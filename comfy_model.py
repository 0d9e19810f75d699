"""The xDiT model as a ComfyUI MODEL (the stepwise path): ComfyUI's own sampling, the pool's forward.

The MODEL is a ModelPatcher around the BaseModel that ComfyUI itself builds for the file (its detection runs
on the header's shapes as meta tensors, so no weight is read here): ComfyUI's model sampling, latent format
and conditioning for that model, unchanged. Only its diffusion model is replaced, by PoolDiffusionModel, whose
forward sends x, the timestep and the conditioning to the workers (the conditioning once per sampling run,
by ComfyUI's cond uuid; comfy_xdit/stepwise.py) and returns their output. ComfyUI's DIFFUSION_MODEL wrappers
run around that forward as around ComfyUI's own models, so EasyCache and LazyCache skip whole pool calls.

What cannot reach the workers is refused with the reason, never dropped: weight patches (LoraLoaderModelOnly:
use LoRA (xDiT) before the conversion), ComfyUI's ControlNets and the pack's own ControlNet conditioning,
attention patches in transformer_options.
"""

from __future__ import annotations

import hashlib
import types

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.utils

from .comfy_xdit.client import CONTROL_KEY, Engine, ModelHandle
from .comfy_xdit.models.checkpoint import ST_DTYPES, read_header
from .comfy_xdit.pool.controller import PoolError

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3fn": torch.bfloat16}
CHECKSUM_SAMPLES = 4096  # values of a conditioning tensor summed into its cache key (guards in-place changes)


def comfy_model_config(path: str):
    """ComfyUI's model config for a diffusion-model file, by ComfyUI's own detection (as its UNETLoader runs it)
    on meta tensors of the header's shapes and dtypes."""
    sd = {k: torch.empty(v["shape"], dtype=getattr(torch, ST_DTYPES.get(v["dtype"], "float32")), device="meta")
          for k, v in read_header(path).items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    inner = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    sd = inner or sd
    config = comfy.model_detection.model_config_from_unet(sd, "")
    if config is None:
        converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")  # diffusers layout, as ComfyUI reads it
        config = comfy.model_detection.model_config_from_unet(converted, "") if converted is not None else None
    if config is None:
        raise ValueError(f"{path}: ComfyUI does not recognise this diffusion model, so it cannot give it a MODEL")
    return config


def checksum(t: torch.Tensor) -> float:
    """A cheap sum over evenly spaced values of t (where it lives: no copy off the GPU)."""
    flat = t.detach().reshape(-1)
    return float(flat[::max(1, flat.numel() // CHECKSUM_SAMPLES)].double().sum())


def chunk_key(uuid, cond: dict) -> str:
    """The workers' cache key of one chunk's conditioning: ComfyUI's cond uuid (new for every sampling run),
    and each tensor's name, shape, dtype and checksum (a cond padded to another length is another key)."""
    parts = [str(uuid)] + [f"{k}{tuple(v.shape)}{v.dtype}{checksum(v)!r}" for k, v in sorted(cond.items())]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


class PoolDiffusionModel(torch.nn.Module):
    """The BaseModel's diffusion_model: forward(x, timestep, context, control, transformer_options, **conds) as
    ComfyUI's diffusion models take it, run on the pool. It holds no weights (ComfyUI sees a zero-size model)."""

    def __init__(self, engine: Engine, handle: ModelHandle, dtype: torch.dtype):
        super().__init__()
        self.engine, self.handle, self.dtype = engine, handle, dtype
        self._seen: set[str] = set()  # chunk keys sent so far: a new one starts a sampling run

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, control, transformer_options, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if control is not None:
            raise ValueError("ComfyUI's ControlNets cannot run with an xDiT MODEL: use Load ControlNet (xDiT) and "
                             "Apply ControlNet (xDiT) with the Sampler (xDiT)")
        patched = [k for k in ("patches", "patches_replace") if transformer_options.get(k)]
        if patched:
            raise ValueError(f"this workflow patches the model's attention or blocks ({', '.join(patched)} in "
                             "transformer_options); the xDiT workers cannot run ComfyUI-side patches")
        inputs = {"context": context, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        # ComfyUI's reference-latent method (a string; FluxKontextMultiReferenceLatentMethod sets it): anything but
        # "index" places the references side by side, sent as the flag the Sampler (xDiT) path sends too
        method = inputs.pop("ref_latents_method", None)
        if method not in (None, "index") and inputs.get("ref_latents"):
            inputs["ref_latents_offset"] = torch.ones(x.shape[0], 1)
        for name, value in list(inputs.items()):  # a list input (Qwen-Image-Edit's ref_latents): one per tensor
            if isinstance(value, (list, tuple)):
                del inputs[name]
                inputs.update({f"{name}.{i}": v for i, v in enumerate(value)})
        rows = x.shape[0]
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
                raise ValueError(f"the xDiT workers take per-row tensors; the model input {name!r} is "
                                 f"{type(value).__name__}{list(getattr(value, 'shape', []))} for {rows} rows")
        uuids = list(transformer_options.get("uuids") or [])
        parts = len(uuids) if uuids and rows % len(uuids) == 0 else 1
        per = rows // parts
        chunks = []
        for i in range(parts):
            cond = {k: v[i * per:(i + 1) * per] for k, v in inputs.items()}
            chunks.append((chunk_key(uuids[i] if uuids else None, cond), per, cond))
        new = {key for key, _, _ in chunks} - self._seen
        self._seen |= new
        try:
            out = self.engine.forward(self.handle, x, timestep, chunks, new_run=bool(new))
        except PoolError as e:
            raise RuntimeError(f"xDiT worker pool: {e}") from e
        return out.to(x.device)


class PoolModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that refuses weight patches: they would change weights that live in the workers."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        raise ValueError("an xDiT MODEL's weights live in the worker pool, where ComfyUI's LoRA and model patches "
                         "cannot reach them: add LoRAs with LoRA (xDiT) before xDiT Model to MODEL")


def _no_pack_controlnets(extra_conds):
    """BaseModel.extra_conds, refusing conditioning from Apply ControlNet (xDiT), which only the Sampler (xDiT)
    runs (ComfyUI would drop it silently)."""

    def checked(**kwargs):
        if kwargs.get(CONTROL_KEY):
            raise ValueError("Apply ControlNet (xDiT) runs with the Sampler (xDiT), not with ComfyUI's samplers on an "
                             "xDiT MODEL")
        return extra_conds(**kwargs)

    return checked


def make_model(engine: Engine, handle: ModelHandle) -> PoolModelPatcher:
    """ComfyUI's MODEL for the handle's file, its diffusion model on the pool."""
    config = comfy_model_config(handle.path)
    dtype = COMPUTE_DTYPES[handle.dtype]
    config.set_inference_dtype(dtype, None)
    config.unet_config["disable_unet_model_creation"] = True  # the weights stay in the workers
    base = config.get_model({}, "")
    base.diffusion_model = PoolDiffusionModel(engine, handle, dtype)
    in_dim = config.unet_config.get("in_dim")
    if in_dim is not None:  # Wan: BaseModel.concat_cond reads the input channels off patch_embedding's weight
        base.diffusion_model.patch_embedding = types.SimpleNamespace(
            weight=torch.empty(1, in_dim, 1, 1, 1, device="meta"))
    shift_sampling = None
    if handle.shift is not None:  # a ModelSampling (xDiT) node before the conversion
        from .comfy_xdit.models.family import detect_family

        family = detect_family(handle.path)[0]
        multiplier = family.shift_multiplier
        if not hasattr(base.model_sampling, "shift") and multiplier is None:  # discrete DDPM (PixArt): no shift
            raise ValueError(f"{family.label} samples with discrete DDPM steps, which have no shift: remove the "
                             "ModelSampling (xDiT) node before xDiT Model to MODEL")
        if multiplier is None:  # the model's own sampling at another shift (ModelSamplingSD3 / ModelSamplingFlux)
            sampling = base.model_sampling
            kept = {k: getattr(sampling, k) for k in ("multiplier",) if hasattr(sampling, k)}
            sampling.set_parameters(shift=handle.shift, **kept)
        else:  # discrete flow at the family's multiplier, as ComfyUI's ModelSamplingAuraFlow patches Qwen-Image
            class DiscreteFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
                pass

            shift_sampling = DiscreteFlow(config)
            shift_sampling.set_parameters(shift=handle.shift, multiplier=multiplier)
    base.memory_required = lambda input_shape, cond_shapes={}: 4 * 4 * int(torch.Size(input_shape).numel())
    base.extra_conds = _no_pack_controlnets(base.extra_conds)
    patcher = PoolModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                               offload_device=comfy.model_management.unet_offload_device())
    if shift_sampling is not None:
        patcher.add_object_patch("model_sampling", shift_sampling)
    return patcher
