"""ComfyUI nodes of the comfy_xdit pack: the only module that imports ComfyUI.

Each node translates ComfyUI's types (CONDITIONING, LATENT, IMAGE) to plain tensors and
calls the engine in comfy_xdit/client.py, which drives the worker pool.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from .comfy_xdit.client import (CONTROL_KEY, Conditioning, Control, ControlNetHandle, Engine, ModelHandle, VaeHandle,
                                WEIGHT_DTYPES, available_devices)
from .comfy_xdit.pool.controller import PoolError
from .comfy_xdit.sampling import SAMPLERS, SCHEDULERS, resolution_shift
from .comfy_xdit.web_status import ActivityTracker, make_event_sender, register_routes

CATEGORY = "xDiT"


def _comfy_gpus() -> set[int]:
    """The CUDA devices ComfyUI itself uses: its main device and where its loaded models live."""
    mm = comfy.model_management
    devices = [mm.get_torch_device()] + [model.load_device for model in mm.loaded_models()]
    # a device without an index is the current one, 0 (ComfyUI picks GPUs by CUDA_VISIBLE_DEVICES)
    return {d.index or 0 for d in map(torch.device, devices) if d.type == "cuda"}


def _make_room(amounts: dict[int, int]) -> None:
    """Before a pool job: have ComfyUI unload its own models from the GPUs it shares with the pool
    until each has `amounts[gpu]` bytes free (what the pool will take there beyond what it holds).

    ComfyUI's get_free_memory(dev) is torch.cuda.mem_get_info(dev)'s free memory, which already counts
    the pool's worker processes as used, plus ComfyUI's own cached-but-unused blocks; free_memory()
    unloads (or partly offloads) ComfyUI's models on dev, least recently used first, until that exceeds
    the amount. soft_empty_cache() then hands ComfyUI's cached blocks back to the driver, where the
    workers can use them. GPUs ComfyUI does not use are left alone (a query there would open a CUDA
    context in this process)."""
    shared = sorted(set(amounts) & _comfy_gpus())
    for gpu in shared:
        comfy.model_management.free_memory(amounts[gpu], torch.device("cuda", gpu))
    if shared:
        comfy.model_management.soft_empty_cache()


ENGINE = Engine(make_room=_make_room)
TRACKER = ActivityTracker()  # what the xDiT sidebar tab shows: the running request, its steps, the last error
STRATEGIES = ("auto", "ulysses", "ring", "cfg_parallel", "data_parallel", "pipefusion", "manual")
GPU_IDS_INPUT = ("STRING", {"default": "", "tooltip": "Which GPUs, e.g. 0,1: as many as gpus, numbered as ComfyUI "
                                                      "numbers them. Empty: the first ones. On GPUs ComfyUI does "
                                                      "not use, its text encoders can stay loaded."})


def _max_gpus() -> int:
    return max(1, available_devices()[1])


def _run(fn, *args, **kwargs):
    """Engine errors become plain exceptions with the root cause: ComfyUI shows them, and stays up."""
    try:
        return TRACKER.run(fn, *args, **kwargs)  # also reports kind, model, steps and errors to the sidebar tab
    except PoolError as e:
        raise RuntimeError(f"xDiT worker pool: {e}") from e


def _progress(total: int):
    """on_progress for a request: ComfyUI's progress bar on the running node, and its interrupt (which makes
    the pool cancel the request)."""
    bar = comfy.utils.ProgressBar(total)

    def on_progress(args, _preview):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(args["step"], args["total"])

    return on_progress


def _gpu_ids(text: str) -> tuple[int, ...]:
    """The loaders' gpu_ids ("0,1"; empty = the first GPUs); the engine checks them against the machine."""
    try:
        return tuple(int(p) for p in str(text or "").replace(",", " ").split())
    except ValueError:
        raise ValueError(f"gpu_ids {text!r}: write GPU numbers separated by commas, e.g. 0,1, or leave it "
                         "empty for the first GPUs") from None


def _parallel(strategy: str, gpus: int, ulysses: int, ring: int, cfg: int = 1, dp: int = 1, pp: int = 1) -> tuple:
    """Degrees for the loader's strategy; empty = auto (the workers pick the fastest layout that fits)."""
    if strategy == "auto":
        return ()
    if strategy == "ulysses":
        return (("ulysses_degree", gpus),)
    if strategy == "ring":
        return (("ring_degree", gpus),)
    if strategy == "cfg_parallel":  # cond and uncond on different GPUs; the rest splits the sequence
        if gpus % 2:
            raise ValueError(f"cfg_parallel needs an even number of GPUs, got {gpus}")
        return (("cfg_degree", 2), ("ulysses_degree", gpus // 2))
    if strategy == "data_parallel":  # batch items on different GPUs
        return (("dp_degree", gpus),)
    if strategy == "pipefusion":  # blocks split over GPUs, latent in row patches (1 warmup step, then stale K/V)
        return (("pipefusion_degree", gpus),)
    if ulysses * ring * cfg * dp * pp != gpus:
        what = f"dp_degree {dp} x cfg_degree {cfg} x " + (f"pipefusion_degree {pp} x " if pp > 1 else "")
        raise ValueError(f"manual strategy: {what}ulysses_degree {ulysses} x ring_degree {ring} = "
                         f"{ulysses * ring * cfg * dp * pp}, but {gpus} GPUs were asked for; "
                         "the product must equal the GPU count")
    degrees = {"dp_degree": dp, "cfg_degree": cfg, "ring_degree": ring, "ulysses_degree": ulysses}
    if pp > 1:
        degrees["pipefusion_degree"] = pp
    return tuple(sorted(degrees.items()))


def _conditioning(cond, name: str) -> Conditioning:
    if not cond:
        raise ValueError(f"{name} conditioning is empty")
    if len(cond) > 1:
        raise ValueError(f"{name} conditioning has {len(cond)} entries (Conditioning Combine, areas); "
                         "xDiT Sampler takes a single entry")
    tokens, extra = cond[0]
    if extra.get("control") is not None:
        raise ValueError(f"{name} conditioning carries a ComfyUI ControlNet; use Apply ControlNet (xDiT) with "
                         "Load ControlNet (xDiT), which run it in the workers")
    # Whether a model needs the pooled output (Flux, SD3 do; Wan has none) is its family's word, said by the
    # workers with the text encoders to use.
    tensors = {}
    vision = extra.get("clip_vision_output")  # CLIPVisionEncode -> WanImageToVideo (Wan I2V)
    if vision is not None:
        tensors["clip_fea"] = vision.penultimate_hidden_states
    for key in ("concat_latent_image", "concat_mask"):  # WanImageToVideo's image conditioning (VAE space, mask)
        if extra.get(key) is not None:
            tensors[key] = extra[key]
    # TextEncodeQwenImageEdit / ReferenceLatent (Qwen-Image-Edit): VAE-space latents, numbered in order
    for i, ref in enumerate(extra.get("reference_latents") or []):
        tensors[f"ref_latents.{i}"] = ref
    # HunyuanDiT's text encoders (CLIPLoader type hunyuan_dit: BERT + mT5), named as comfy.model_base.HunyuanDiT
    # passes them; the masks stay integer
    for key, name_ in (("attention_mask", "text_embedding_mask"), ("conditioning_mt5xl", "encoder_hidden_states_t5"),
                       ("attention_mask_mt5xl", "text_embedding_mask_t5")):
        if extra.get(key) is not None:
            tensors[name_] = extra[key]
    if extra.get("target_width") is not None and extra.get("width") is not None:  # CLIPTextEncodeSDXL-style sizes
        tensors["image_meta_size"] = torch.tensor([[float(extra["height"]), float(extra["width"]),
                                                    float(extra.get("target_height", extra["height"])),
                                                    float(extra["target_width"]), 0.0, 0.0]])
    # CLIPTextEncodePixArtAlpha's size (PixArt-α's micro-conditions), as comfy.model_base.PixArt turns it into c_size
    # / c_ar; families without micro-conditions ignore them
    if extra.get("width") is not None and extra.get("height") is not None:
        h, w = float(extra["height"]), float(extra["width"])
        tensors["c_size"] = torch.tensor([[h, w]])
        tensors["c_ar"] = torch.tensor([[float(extra.get("aspect_ratio", h / w))]])
    # ComfyUI's Qwen-Image places references by frame index unless the method is anything else ("offset",
    # FluxKontextMultiReferenceLatentMethod's "uxo/uno"), which places them side by side
    method = extra.get("reference_latents_method")
    if method not in (None, "index") and "ref_latents.0" in tensors:
        tensors["ref_latents_offset"] = torch.ones(1)
    return Conditioning(tokens, extra.get("pooled_output"), extra.get("guidance"), list(extra.get(CONTROL_KEY, [])),
                        extra=tensors)


def _latent_channels(path: str) -> int | None:
    """The latent channels of a diffusion-model file's family and release, from its header (comfy.sample's
    fix_empty_latent_channels reads them off the model's latent format)."""
    from .comfy_xdit.models.checkpoint import CheckpointError
    from .comfy_xdit.models.family import read_info

    try:
        family, info = read_info(path)
    except CheckpointError:  # the workers' load says what is wrong with the file
        return None
    return family.latent_format_for(info.config).channels


class XDiTModelLoader:
    DESCRIPTION = ("Loads a diffusion transformer (Flux.1, SD3 / SD3.5, Wan 2.1 / 2.2, Qwen-Image, PixArt-α / Σ, "
                   "HunyuanDiT) onto a pool of GPU workers that run it in parallel; the family is read from the file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                              {"tooltip": "Flux.1, SD3 / SD3.5 (or a full SD3.5 checkpoint), Wan, Qwen-Image, "
                                          "PixArt or HunyuanDiT transformer from models/diffusion_models (or "
                                          "models/unet)."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "bf16",
                                                       "tooltip": "bf16/fp16/fp32: compute dtype; fp8 files are upcast "
                                                                  "to it. fp8_e4m3fn: the blocks' weights kept in "
                                                                  "fp8 (half of bf16's memory), computed in bf16."}),
                "gpus": ("INT", {"default": _max_gpus(), "min": 1, "max": _max_gpus(),
                                 "tooltip": "How many GPUs run the model together (one worker each)."}),
                "strategy": (list(STRATEGIES), {"default": "auto",
                                                "tooltip": "auto: sequence parallel (Ulysses, then Ring) when "
                                                           "the model fits each GPU, else the fewest PipeFusion "
                                                           "stages that fit, else fp8 weights. cfg_parallel: "
                                                           "the negative prompt on half the GPUs. "
                                                           "data_parallel: batch items spread over GPUs. "
                                                           "pipefusion: blocks split over GPUs (less memory "
                                                           "per GPU; approximate after the first step). "
                                                           "manual: the degrees below."}),
            },
            "optional": {
                "ulysses_degree": ("INT", {"default": 1, "min": 1, "max": 64, "advanced": True,
                                           "tooltip": "manual strategy: all-to-all over attention heads."}),
                "ring_degree": ("INT", {"default": 1, "min": 1, "max": 64, "advanced": True,
                                        "tooltip": "manual strategy: K/V passed around a ring of GPUs."}),
                "cfg_degree": ("INT", {"default": 1, "min": 1, "max": 2, "advanced": True,
                                       "tooltip": "manual strategy: 2 runs the negative prompt on other GPUs "
                                                  "(needs cfg > 1)."}),
                "dp_degree": ("INT", {"default": 1, "min": 1, "max": 64, "advanced": True,
                                      "tooltip": "manual strategy: batch items on different GPUs."}),
                "gpu_ids": GPU_IDS_INPUT,
                "pipefusion_degree": ("INT", {"default": 1, "min": 1, "max": 64, "advanced": True,
                                              "tooltip": "manual strategy: pipeline stages (blocks split over "
                                                         "GPUs); multiplies with the degrees above."}),
                "num_pipeline_patch": ("INT", {"default": 2, "min": 1, "max": 64, "advanced": True,
                                               "tooltip": "pipefusion: row patches per step; more keeps the "
                                                          "pipeline fuller, each patch smaller."}),
                "warmup_steps": ("INT", {"default": 1, "min": 1, "max": 10000, "advanced": True,
                                         "tooltip": "pipefusion: synchronous steps first; from then on patches "
                                                    "see one-step-old K/V of the others. As many as steps: "
                                                    "exact, no pipelining."}),
                "compile": ("BOOLEAN", {"default": False, "advanced": True,
                                        "tooltip": "torch.compile each transformer block: the first run takes "
                                                   "a minute or more longer, later runs are faster (FLUX.1-dev, "
                                                   "2x H200, 1024 px: 2.3 s compiled vs 3.4 s)."}),
            },
        }

    RETURN_TYPES = ("XDIT_MODEL",)
    OUTPUT_TOOLTIPS = ("The model, resident in the worker pool.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, unet_name, weight_dtype, gpus, strategy, ulysses_degree=1, ring_degree=1, cfg_degree=1,
             dp_degree=1, gpu_ids="", pipefusion_degree=1, num_pipeline_patch=2, warmup_steps=1, compile=False):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        parallel = _parallel(strategy, gpus, ulysses_degree, ring_degree, cfg_degree, dp_degree, pipefusion_degree)
        handle = ModelHandle(path=path, dtype=weight_dtype, gpus=gpus, parallel=parallel, gpu_ids=_gpu_ids(gpu_ids),
                             pipefusion=(("num_pipeline_patch", num_pipeline_patch), ("warmup_steps", warmup_steps)),
                             compile=bool(compile))
        _run(ENGINE.load, handle, on_progress=_progress(100))  # load now, so a bad file fails at this node
        return (handle,)


class XDiTLoraLoader:
    DESCRIPTION = "Adds a LoRA to an xDiT model; merged into the weights in the workers (chainable)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "kohya/ComfyUI, diffusers/peft "
                                                                                "or XLabs Flux LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("XDIT_MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, lora_name, strength_model):
        return (model.with_lora(folder_paths.get_full_path_or_raise("loras", lora_name), strength_model),)


class XDiTModelSamplingShift:
    DESCRIPTION = ("Sets the sampling shift of an xDiT model, as ComfyUI's ModelSamplingSD3 does on a MODEL (for "
                   "Qwen-Image: as ModelSamplingAuraFlow does).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("XDIT_MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, shift):
        return (dataclasses.replace(model, shift=float(shift)),)


class XDiTModelSamplingFromSize:
    DESCRIPTION = ("Sets an xDiT model's sampling shift from an image size, as ComfyUI's ModelSamplingFlux does on a "
                   "MODEL (without it Flux samples at shift 1.15, schnell 1.0, at every size, as KSampler does).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01}),
            "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 8}),
        }}

    RETURN_TYPES = ("XDIT_MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, max_shift, base_shift, width, height):
        shift = resolution_shift(width * height / 256, base_shift=base_shift, max_shift=max_shift)
        return (dataclasses.replace(model, shift=shift),)


class XDiTSampler:
    DESCRIPTION = "Denoises a latent with an xDiT model across the pool's GPUs (KSampler's settings and noise)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("XDIT_MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING", {"tooltip": "Used only when cfg > 1 (Flux dev needs none)."}),
            "latent_image": ("LATENT", {"tooltip": "EmptySD3LatentImage for txt2img, VAE Encode for img2img."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "1.0 for Flux dev/schnell (guidance comes from FluxGuidance)."}),
            "sampler_name": (list(SAMPLERS), {"default": "euler"}),
            "scheduler": (list(SCHEDULERS), {"default": "simple"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "optional": {  # KSamplerAdvanced's controls; the defaults run as KSampler does
            "add_noise": (["enable", "disable"], {"default": "enable"}),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"], {
                "default": "disable", "tooltip": "enable: hand the partly denoised latent to another sampler (a "
                                                 "second model, as Wan 2.2's high- and low-noise experts)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
               add_noise="enable", start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable"):
        samples = latent_image["samples"]
        if not samples.any():  # an empty latent of another channel count: the model's, as ComfyUI does
            channels = _latent_channels(model.path) or (16 if samples.shape[1] == 4 else samples.shape[1])
            if samples.shape[1] != channels:
                samples = torch.zeros(samples.shape[0], channels, *samples.shape[2:])
        cancel = threading.Event()
        # KSamplerAdvanced's rules (nodes.common_ksampler, comfy.samplers.KSampler.sample)
        advanced = dict(add_noise=add_noise != "disable", start_step=int(start_at_step), last_step=int(end_at_step),
                        force_full_denoise=return_with_leftover_noise != "enable")
        out = _run(ENGINE.sample, model, _conditioning(positive, "positive"),
                   _conditioning(negative, "negative") if cfg != 1.0 else None, samples, seed, steps, cfg,
                   sampler_name, scheduler, denoise, latent_image.get("noise_mask"), latent_image.get("batch_index"),
                   on_progress=_progress(steps), cancel=cancel, advanced=advanced)
        result = latent_image.copy()
        result["samples"] = out
        return (result,)


class XDiTModelToComfy:
    DESCRIPTION = ("The xDiT model as a ComfyUI MODEL: ComfyUI's own samplers (KSampler, KSamplerAdvanced, "
                   "SamplerCustomAdvanced, ...) and MODEL nodes (ModelSamplingFlux, EasyCache, ...) drive it, and "
                   "each call of the model runs on the pool. Same loaded model as the Sampler (xDiT) uses.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("XDIT_MODEL", {"tooltip": "From Load Diffusion Model (xDiT), after any "
                                                                 "LoRA (xDiT) and ModelSampling (xDiT) nodes."})}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A MODEL whose weights stay in the workers (ComfyUI's LoRA loaders and ControlNets cannot "
                       "patch it: use LoRA (xDiT), and Apply ControlNet (xDiT) with the Sampler (xDiT)).",)
    FUNCTION = "convert"
    CATEGORY = CATEGORY

    def convert(self, model):
        from .comfy_model import make_model  # ComfyUI's model classes: imported when a MODEL is first asked for

        return (make_model(ENGINE, model),)


class XDiTVAELoader:
    DESCRIPTION = "Loads a VAE (ae.safetensors and friends) into the xDiT workers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),),
                             "gpus": ("INT", {"default": _max_gpus(), "min": 1, "max": _max_gpus()})},
                "optional": {"gpu_ids": GPU_IDS_INPUT}}

    RETURN_TYPES = ("XDIT_VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, vae_name, gpus, gpu_ids=""):
        handle = VaeHandle(path=folder_paths.get_full_path_or_raise("vae", vae_name), gpus=gpus,
                           gpu_ids=_gpu_ids(gpu_ids))
        _run(ENGINE.load, handle)
        return (handle,)


class XDiTVAEDecode:
    DESCRIPTION = "Decodes a latent to an image in the xDiT workers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "vae": ("XDIT_VAE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, samples, vae):
        return (_run(ENGINE.decode, vae, samples["samples"]),)


class XDiTVAEEncode:
    DESCRIPTION = "Encodes an image to a latent in the xDiT workers (for img2img)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE",), "vae": ("XDIT_VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, pixels, vae):
        return ({"samples": _run(ENGINE.encode, vae, pixels[..., :3])},)


class XDiTControlNetLoader:
    DESCRIPTION = "Picks a Flux ControlNet (InstantX, Union or XLabs) for the xDiT workers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"control_net_name": (folder_paths.get_filename_list("controlnet"),)}}

    RETURN_TYPES = ("XDIT_CONTROLNET",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, control_net_name):
        return (ControlNetHandle(folder_paths.get_full_path_or_raise("controlnet", control_net_name)),)


class XDiTApplyControlNet:
    DESCRIPTION = ("Applies a ControlNet to both conditionings; it runs in the workers under the same "
                   "sequence split as the model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control_net": ("XDIT_CONTROLNET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            "optional": {
                "vae": ("XDIT_VAE", {"tooltip": "Needed by InstantX/Union ControlNets (they take a VAE-encoded image)."}),
                "union_mode": ("INT", {"default": -1, "min": -1, "max": 15, "advanced": True,
                                       "tooltip": "Union ControlNet control type; -1 for none."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None,
              union_mode=-1):
        if strength == 0:
            return (positive, negative)
        control = Control(control_net, image, strength, start_percent, end_percent, vae,
                          None if union_mode < 0 else union_mode)

        def add(cond):
            return [[t, dict(d, **{CONTROL_KEY: list(d.get(CONTROL_KEY, [])) + [control]})] for t, d in cond]

        return (add(positive), add(negative))


NODE_CLASS_MAPPINGS = {
    "XDiTModelLoader": XDiTModelLoader,
    "XDiTLoraLoader": XDiTLoraLoader,
    "XDiTSampler": XDiTSampler,
    "XDiTModelSamplingSD3": XDiTModelSamplingShift,
    "XDiTModelSamplingFlux": XDiTModelSamplingFromSize,
    "XDiTModelToComfy": XDiTModelToComfy,
    "XDiTVAELoader": XDiTVAELoader,
    "XDiTVAEDecode": XDiTVAEDecode,
    "XDiTVAEEncode": XDiTVAEEncode,
    "XDiTControlNetLoader": XDiTControlNetLoader,
    "XDiTApplyControlNet": XDiTApplyControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTModelLoader": "Load Diffusion Model (xDiT)",
    "XDiTLoraLoader": "LoRA (xDiT)",
    "XDiTSampler": "Sampler (xDiT)",
    "XDiTModelSamplingSD3": "ModelSamplingSD3 (xDiT)",
    "XDiTModelSamplingFlux": "ModelSamplingFlux (xDiT)",
    "XDiTModelToComfy": "xDiT Model to MODEL",
    "XDiTVAELoader": "VAE Loader (xDiT)",
    "XDiTVAEDecode": "VAE Decode (xDiT)",
    "XDiTVAEEncode": "VAE Encode (xDiT)",
    "XDiTControlNetLoader": "Load ControlNet (xDiT)",
    "XDiTApplyControlNet": "Apply ControlNet (xDiT)",
}


def _register_web() -> None:
    """Routes and websocket events of the xDiT sidebar tab (web/xdit.js)."""
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (tests)
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    register_routes(server.routes, ENGINE, TRACKER)
    TRACKER.add_listener(make_event_sender(server.send_sync, ENGINE, TRACKER))


_register_web()
