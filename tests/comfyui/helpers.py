"""Integration tests against a real ComfyUI server: where ComfyUI and its Python are, the models they use
(small random weights in the real file formats), the server's life cycle, and API-format workflows.

These run in the test Python (.venv: torch, safetensors, diffusers and the pack's library); ComfyUI runs in its
own Python (.venv-comfyui, built by scripts/setup_comfyui.sh) as a separate process, driven over HTTP only.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The model files the session's server sees (models/<folder>/<name>).
SD3 = "cxd_tiny_sd35m.safetensors"      # SD3.5-Medium-shaped, SAI all-in-one file (diffusion_models)
FLUX = "cxd_flux_1x1.safetensors"       # Flux dev at full width, 1 double + 1 single block (diffusion_models)
CLIP_L = "cxd_clip_l.safetensors"       # random CLIP-L (text_encoders)
VAE = "cxd_vae16.safetensors"           # 16-channel VAE, BFL/LDM layout (vae)
SD3_LORA = "cxd_sd3_lora.safetensors"   # kohya/ComfyUI names for the SD3 model (loras)
FLUX_LORA = "cxd_flux_lora.safetensors"  # kohya/ComfyUI names for the Flux model (loras)
IMAGE = "cxd_input.png"                 # a 192x128 picture for img2img (input)
WAN_HIGH = "cxd_wan_high.safetensors"   # tiny Wan 2.1 T2V (text_dim 4096), original Wan keys, fp32 (diffusion_models)
WAN_LOW = "cxd_wan_low_fp8_scaled.safetensors"  # another one as ComfyUI's scaled fp8: Wan 2.2's second expert
WAN_I2V = "cxd_wan_i2v.safetensors"     # tiny Wan 2.2 I2V A14B-shaped (36 input channels, no CLIP vision)
WAN_VAE = "cxd_wan21_vae.safetensors"   # the Wan 2.1 VAE at its real widths (ComfyUI's loader fixes them), random
QWEN = "cxd_qwen_1block.safetensors"    # Qwen-Image at full width (ComfyUI fixes it), 1 block, bf16 (diffusion_models)
QWEN_FP8 = "cxd_qwen_1block_fp8_scaled.safetensors"  # the same weights as ComfyUI's scaled fp8
QWEN_TEXT = "cxd_qwen_text.safetensors"  # Qwen2.5-VL-7B-shaped hidden states (input): positive, negative
QWEN_TEXT_LENGTHS = {"positive": 9, "negative": 6}  # tokens: different, not all even
PIXART_SIGMA = "cxd_pixart_sigma_1block.safetensors"  # PixArt-Σ XL-2 1024 at full width, 1 block, original keys
PIXART_ALPHA = "cxd_pixart_alpha_1block.safetensors"  # PixArt-α XL-2 1024-MS (micro-conditions), 1 block, ComfyUI keys
SDXL_VAE = "cxd_sdxl_vae.safetensors"   # 4-channel KL VAE at SDXL's real widths, LDM keys, random (vae)
TEST_NODES = "cxd_test_nodes"           # test-only custom nodes (custom_nodes/), see write_test_nodes


# --- where things are -------------------------------------------------------------------------------------

def _is_comfyui(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy"))


def find_comfyui() -> tuple[str | None, str]:
    """(ComfyUI source folder, how it was found) or (None, why not): COMFYUI_DIR, else the ComfyUI this pack is
    installed in (ComfyUI/custom_nodes/<pack>), else ../shared/comfyui beside the repository."""
    explicit = os.environ.get("COMFYUI_DIR")
    if explicit:
        if _is_comfyui(explicit):
            return os.path.abspath(explicit), "COMFYUI_DIR"
        return None, f"COMFYUI_DIR={explicit} is not a ComfyUI folder (no main.py and comfy/ there)"
    installed = os.path.dirname(os.path.dirname(REPO))
    if os.path.basename(os.path.dirname(REPO)) == "custom_nodes" and _is_comfyui(installed):
        return installed, "the ComfyUI the pack is installed in"
    shared = os.path.join(os.path.dirname(REPO), "shared", "comfyui")
    if _is_comfyui(shared):
        return shared, "../shared/comfyui"
    return None, ("no ComfyUI found: set COMFYUI_DIR, install the pack in ComfyUI/custom_nodes, or provide "
                  f"{shared}")


def find_comfyui_python() -> tuple[str | None, str]:
    """(ComfyUI's Python, how it was found) or (None, why not): COMFYUI_PYTHON, else .venv-comfyui/bin/python
    unless scripts/setup_comfyui.sh left .venv-comfyui.failed (its reason is the skip reason)."""
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit, "COMFYUI_PYTHON"
        return None, f"COMFYUI_PYTHON={explicit} is not an executable"
    failed = os.path.join(REPO, ".venv-comfyui.failed")
    if os.path.isfile(failed):
        with open(failed, errors="replace") as f:
            lines = f.read().strip().splitlines()
        return None, ("scripts/setup_comfyui.sh could not build .venv-comfyui: " + (lines[0] if lines else "?")
                      + (" ... " + " | ".join(lines[-3:]) if len(lines) > 1 else ""))
    venv = os.path.join(REPO, ".venv-comfyui", "bin", "python")
    if os.access(venv, os.X_OK):
        return venv, ".venv-comfyui"
    return None, "no Python for ComfyUI: run scripts/setup_comfyui.sh (builds .venv-comfyui) or set COMFYUI_PYTHON"


def built_by_setup_script(python: str) -> bool:
    """Whether `python` is .venv-comfyui's and scripts/setup_comfyui.sh finished building it (its stamp)."""
    venv = os.path.join(REPO, ".venv-comfyui")
    # the folders, not the files: every venv's bin/python links to the same base interpreter
    return (os.path.realpath(os.path.dirname(os.path.abspath(python))) == os.path.realpath(os.path.join(venv, "bin"))
            and os.path.isfile(os.path.join(venv, ".cxd-setup-stamp")))


# --- models -----------------------------------------------------------------------------------------------

def rel_l2(a, b) -> float:
    """|a - b| / |b| over the whole tensor, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _clip_l_state_dict(seed: int = 0) -> dict:
    """A random CLIP-L text encoder under the original names ComfyUI reads (text_model.*, text_projection)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w, ff = 768, 3072

    def rnd(*shape, std=0.02):
        return torch.randn(shape, generator=g) * std

    sd = {"text_model.embeddings.token_embedding.weight": rnd(49408, w),
          "text_model.embeddings.position_embedding.weight": rnd(77, w, std=0.01),
          "text_model.final_layer_norm.weight": torch.ones(w), "text_model.final_layer_norm.bias": torch.zeros(w),
          "text_projection.weight": torch.eye(w)}
    for i in range(12):
        p = f"text_model.encoder.layers.{i}."
        for proj in "qkv":
            sd[f"{p}self_attn.{proj}_proj.weight"], sd[f"{p}self_attn.{proj}_proj.bias"] = rnd(w, w), rnd(w)
        sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"] = rnd(w, w), rnd(w)
        for n in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{n}.weight"], sd[f"{p}{n}.bias"] = torch.ones(w), torch.zeros(w)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(ff, w), rnd(ff)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(w, ff), rnd(w)
    return sd


def _kohya_lora(weights: dict, modules: dict, seed: int) -> dict:
    """kohya/ComfyUI LoRA (lora_unet_<module with underscores>.lora_down/lora_up/alpha) on `modules`
    ({original module name: (rank, alpha or None)}) of a model whose original-layout weights are `weights`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (rank, alpha) in modules.items():
        out, inn = weights[mod + ".weight"].shape
        # |delta| about a fifth of the weight's: a clearly different result, still a well-behaved model
        std = (0.2 * float(weights[mod + ".weight"].std()) / (rank ** 0.5)) ** 0.5
        name = "lora_unet_" + mod.replace(".", "_")
        sd[name + ".lora_down.weight"] = torch.randn(rank, inn, generator=g) * std
        sd[name + ".lora_up.weight"] = torch.randn(out, rank, generator=g) * std
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(float(alpha))
    return sd


# Test-only nodes the session's server loads from custom_nodes/cxd_test_nodes (never part of the pack): what
# cannot be built tiny. Qwen-Image's only text encoder is Qwen2.5-VL-7B (CLIPLoader type qwen_image), so its
# CONDITIONING [1, T, 3584] comes from a tensor file in input/.
_TEST_NODES_SOURCE = '''"""Test-only ComfyUI nodes for the comfy_xdit tests (see tests/comfyui/helpers.py)."""

import os

import folder_paths


class CXDTestLoadConditioning:
    DESCRIPTION = "A CONDITIONING [[tensor, {}]] from a tensor of a safetensors file in the input folder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("STRING", {"default": ""}), "key": ("STRING", {"default": "context"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, file, key):
        from safetensors.torch import load_file

        tensors = load_file(os.path.join(folder_paths.get_input_directory(), file))
        return ([[tensors[key], {}]],)


NODE_CLASS_MAPPINGS = {"CXDTestLoadConditioning": CXDTestLoadConditioning}
'''


def write_test_nodes(base: str) -> str:
    """Write the test-only custom node package into base/custom_nodes (before the server starts: ComfyUI
    imports custom nodes once); returns its folder. Its node CXDTestLoadConditioning(file, key) returns
    [[tensor, {}]] of the tensor `key` in input/<file>."""
    folder = os.path.join(base, "custom_nodes", TEST_NODES)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "__init__.py"), "w") as f:
        f.write(_TEST_NODES_SOURCE)
    return folder


def write_models(base: str, flux: bool = True, qwen: bool = True, pixart: bool = True) -> dict:
    """Small random models in the real formats under base/models (and an input picture under base/input);
    returns {what: file name}. Takes the pack's own writers, so the files are what users' files look like:
    - SD3: an SD3.5-Medium-shaped tiny transformer (dual attention, q/k norm) as SAI's all-in-one checkpoint
      (model.diffusion_model.* beside stand-in text encoder / VAE tensors); ComfyUI's UNETLoader and the pack's
      loader both read it;
    - Flux: ComfyUI detects Flux with hidden size 3072, 24 heads and a 4096-wide context whatever the file says
      (only depth, single depth, vec_in_dim and guidance are read), so this one is full width with 1 double and
      1 single block, vec_in 2048 (CLIPLoader type sd3 with CLIP-L alone gives context [B, 77, 4096] and pooled
      [B, 2048]), guidance embedder (dev), BFL keys under model.diffusion_model., fp32 (about 2 GB);
    - CLIP-L (text_encoders), a 16-channel VAE with the real widths (vae: ComfyUI's VAE loader assumes a
      128-channel first level), kohya LoRAs for both transformers (loras);
    - Wan: two tiny Wan 2.1 T2V transformers in the original layout (ComfyUI's repackaged files), the second
      as ComfyUI's scaled fp8, the two experts of a Wan 2.2-style chain; a Wan 2.2 I2V-shaped one (36 input
      channels); the Wan 2.1 VAE at its real widths;
    - Qwen-Image: ComfyUI reads only the input channels and the depth off the file (24 heads of 128, text width
      3584 fixed), so full width with 1 block (about 370M parameters), bf16, and the same weights as ComfyUI's
      scaled fp8; text-encoder-shaped hidden states for CXDTestLoadConditioning (input/, write_test_nodes);
    - PixArt: ComfyUI fixes 16 heads of 72 and T5's 4096-wide text, and reads the depth, the micro-conditions
      (ar_embedder) and the position interpolation (pos_embed's size) off the file, so PixArt-Σ XL-2 1024 and
      PixArt-α XL-2 1024-MS at full width with 1 block each (about 37M parameters), fp32, with the released files'
      y_embedding and pos_embed (Σ in the original keys, α under model.diffusion_model.); a 4-channel KL VAE at
      SDXL's widths with quant_conv / post_quant_conv (LDM keys) for their 4-channel latents."""
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import save_file

    from comfy_xdit.models.flux.checkpoint import diffusers_to_bfl, write_flux_checkpoint
    from comfy_xdit.models.flux.random import flux_config, random_flux
    from comfy_xdit.models.sd3.checkpoint import sai_from_diffusers, write_sd3_checkpoint
    from comfy_xdit.models.sd3.random import random_sd3, sd3_config
    from comfy_xdit.vae.loader import write_vae_checkpoint

    models = os.path.join(base, "models")
    for sub in ("diffusion_models", "vae", "text_encoders", "loras"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    os.makedirs(os.path.join(base, "input"), exist_ok=True)

    sd3 = random_sd3(sd3_config("tiny-sd3.5-medium", joint_attention_dim=4096, pooled_projection_dim=2048), seed=0)
    write_sd3_checkpoint(sd3, os.path.join(models, "diffusion_models", SD3), layout="full")
    sai = sai_from_diffusers(sd3.state_dict())
    last = sd3.config.num_layers - 1
    # fused qkv (split by the pack), dual attention's attn2, the text stream, adaLN halves the SAI layout swaps
    save_file(_kohya_lora(sai, {"joint_blocks.0.x_block.attn.qkv": (4, 2.0),
                                "joint_blocks.0.x_block.attn2.qkv": (4, None),
                                "joint_blocks.1.context_block.attn.proj": (2, 1.0),
                                "joint_blocks.2.x_block.mlp.fc2": (4, 8.0),
                                f"joint_blocks.{last}.context_block.adaLN_modulation.1": (2, 2.0),
                                "final_layer.adaLN_modulation.1": (4, 4.0),
                                "context_embedder": (4, None)}, seed=1),
              os.path.join(models, "loras", SD3_LORA))
    del sd3, sai

    if flux:
        model = random_flux(flux_config("flux-dev", num_layers=1, num_single_layers=1, joint_attention_dim=4096,
                                        pooled_projection_dim=2048, guidance_embeds=True), seed=0)
        write_flux_checkpoint(model, os.path.join(models, "diffusion_models", FLUX), layout="comfy")
        bfl = diffusers_to_bfl(model.state_dict())
        save_file(_kohya_lora(bfl, {"double_blocks.0.img_attn.qkv": (4, 2.0), "double_blocks.0.txt_mlp.0": (4, None),
                                    "single_blocks.0.linear1": (4, 4.0), "single_blocks.0.linear2": (2, None)},
                              seed=2),
                  os.path.join(models, "loras", FLUX_LORA))
        del model, bfl

    # Wan: ComfyUI reads width, depth, ffn width and input channels off the file; heads are width // 128 and the
    # text width is fixed at 4096 (CLIP-L through CLIPLoader type sd3 gives [B, 77, 4096])
    from comfy_xdit.models.wan import WAN
    from comfy_xdit.models.wan.checkpoint import write_wan_checkpoint

    for name, seed, scaled, extra in ((WAN_HIGH, 0, False, {}), (WAN_LOW, 1, True, {}),
                                      (WAN_I2V, 2, False, dict(in_channels=36))):
        wan = WAN.random(dict(WAN.preset_config("tiny-wan-t2v"), text_dim=4096, **extra), seed=seed)
        write_wan_checkpoint(wan, os.path.join(models, "diffusion_models", name), layout="wan", scaled_fp8=scaled)
    del wan
    from diffusers import AutoencoderKLWan

    from comfy_xdit.vae.wan import write_wan_vae_checkpoint

    torch.manual_seed(0)
    write_wan_vae_checkpoint(AutoencoderKLWan().eval(), os.path.join(models, "vae", WAN_VAE), layout="wan")

    if qwen:
        from comfy_xdit.models.qwen import QWEN as QWEN_FAMILY
        from comfy_xdit.models.qwen.checkpoint import write_qwen_checkpoint

        config = dict(QWEN_FAMILY.preset_config("qwen-image"), num_layers=1)
        qwen_model = QWEN_FAMILY.random(config, seed=0, dtype=torch.bfloat16)  # drawn in fp32, held in bf16
        write_qwen_checkpoint(qwen_model, os.path.join(models, "diffusion_models", QWEN))
        write_qwen_checkpoint(qwen_model, os.path.join(models, "diffusion_models", QWEN_FP8), scaled_fp8=True)
        del qwen_model
        g = torch.Generator().manual_seed(3)
        save_file({k: torch.randn(1, n, config["joint_attention_dim"], generator=g)
                   for k, n in QWEN_TEXT_LENGTHS.items()}, os.path.join(base, "input", QWEN_TEXT))

    if pixart:
        from comfy_xdit.models.pixart import PIXART as PIXART_FAMILY
        from comfy_xdit.models.pixart.checkpoint import write_pixart_checkpoint

        for name, preset, layout, seed in ((PIXART_SIGMA, "pixart-sigma-xl-2-1024", "pixart", 0),
                                           (PIXART_ALPHA, "pixart-alpha-xl-2-1024", "comfy", 1)):
            pixart_model = PIXART_FAMILY.random(dict(PIXART_FAMILY.preset_config(preset), num_layers=1), seed=seed)
            write_pixart_checkpoint(pixart_model, os.path.join(models, "diffusion_models", name), layout=layout)
        del pixart_model
        torch.manual_seed(1)
        sdxl_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4).eval()
        write_vae_checkpoint(sdxl_vae, os.path.join(models, "vae", SDXL_VAE), layout="ldm")
        del sdxl_vae

    save_file(_clip_l_state_dict(seed=0), os.path.join(models, "text_encoders", CLIP_L))
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    write_vae_checkpoint(vae, os.path.join(models, "vae", VAE), layout="ldm")
    # a smooth picture with some detail: gradients and rings, 192 wide, 128 high
    y, x = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 192), indexing="ij")
    rgb = torch.stack([x, y, 0.5 + 0.5 * torch.sin(30 * ((x - 0.5) ** 2 + (y - 0.5) ** 2))], dim=-1)
    Image.fromarray((rgb * 255).round().byte().numpy()).save(os.path.join(base, "input", IMAGE))
    return dict(sd3=SD3, flux=FLUX if flux else None, clip_l=CLIP_L, vae=VAE, sd3_lora=SD3_LORA,
                flux_lora=FLUX_LORA if flux else None, image=IMAGE, wan_high=WAN_HIGH, wan_low=WAN_LOW,
                wan_i2v=WAN_I2V, wan_vae=WAN_VAE, qwen=QWEN if qwen else None,
                qwen_fp8=QWEN_FP8 if qwen else None, qwen_text=QWEN_TEXT if qwen else None,
                pixart_sigma=PIXART_SIGMA if pixart else None, pixart_alpha=PIXART_ALPHA if pixart else None,
                sdxl_vae=SDXL_VAE if pixart else None)


# --- workflows --------------------------------------------------------------------------------------------

class Workflow(dict):
    """An API-format prompt being built: add() returns the new node's id; out(id, i) is a link to its output i.

        wf = Workflow()
        clip = wf.add("CLIPLoader", clip_name=CLIP_L, type="sd3")
        pos = wf.add("CLIPTextEncode", text="a lighthouse", clip=wf.out(clip))
    """

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> str:
        node_id = node_id or str(len(self) + 1)
        while node_id in self:
            node_id = str(int(node_id) + 1) if node_id.isdigit() else node_id + "_"
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]

    def save_latent(self, samples: str, prefix: str | None = None) -> str:
        """A SaveLatent of node `samples`' LATENT; read it back with ComfyServer.latent(entry, <returned id>)."""
        return self.add("SaveLatent", samples=self.out(samples), filename_prefix=prefix or f"cxd_{samples}")


@dataclass
class Common:
    """Node ids of the parts most workflows share (see common_nodes)."""

    clip: str
    positive: str
    negative: str
    sd3_unet: str | None = None      # ComfyUI's UNETLoader of the SD3 file (MODEL)
    flux_unet: str | None = None     # ComfyUI's UNETLoader of the Flux file (MODEL)
    flux_positive: str | None = None  # positive with FluxGuidance 3.5
    flux_negative: str | None = None
    vae: str | None = None           # ComfyUI's VAELoader
    extra: dict = field(default_factory=dict)


def common_nodes(wf: Workflow, sd3: bool = True, flux: bool = False, vae: bool = False,
                 positive: str = "a lighthouse on a cliff at dusk", negative: str = "blurry, low quality") -> Common:
    """The text encoder (CLIPLoader type sd3 with the random CLIP-L: context [B, 77, 4096], pooled [B, 2048],
    which fits both transformers), a positive and a negative CLIPTextEncode, ComfyUI's UNETLoader of the SD3
    and/or Flux file (weight_dtype default: fp32 on the CPU), FluxGuidance for Flux, and ComfyUI's VAELoader."""
    clip = wf.add("CLIPLoader", clip_name=CLIP_L, type="sd3", device="default")
    pos = wf.add("CLIPTextEncode", text=positive, clip=wf.out(clip))
    neg = wf.add("CLIPTextEncode", text=negative, clip=wf.out(clip))
    c = Common(clip=clip, positive=pos, negative=neg)
    if sd3:
        c.sd3_unet = wf.add("UNETLoader", unet_name=SD3, weight_dtype="default")
    if flux:
        c.flux_unet = wf.add("UNETLoader", unet_name=FLUX, weight_dtype="default")
        c.flux_positive = wf.add("FluxGuidance", guidance=3.5, conditioning=wf.out(pos))
        c.flux_negative = wf.add("FluxGuidance", guidance=3.5, conditioning=wf.out(neg))
    if vae:
        c.vae = wf.add("VAELoader", vae_name=VAE)
    return c


def xdit_loader(wf: Workflow, unet_name: str, gpus: int = 1, strategy: str = "auto", **optional) -> str:
    """Load Diffusion Model (xDiT) in fp32 (the comparisons are against ComfyUI's fp32 MODEL on the CPU)."""
    return wf.add("XDiTModelLoader", unet_name=unet_name, weight_dtype="fp32", gpus=gpus, strategy=strategy,
                  **optional)


def sampler_pair(wf: Workflow, xdit_model: str, comfy_model: str, positive: str, negative: str, latent: str,
                 label: str, **settings) -> tuple[str, str]:
    """Sampler (xDiT) on `xdit_model` and KSampler on `comfy_model` with the same settings, each LATENT saved;
    returns the two SaveLatent ids (xdit, comfy). Settings default to seed 7, 4 steps, cfg 1, euler/simple,
    denoise 1."""
    s = dict(dict(seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0), **settings)
    ours = wf.add("XDiTSampler", model=wf.out(xdit_model), positive=wf.out(positive), negative=wf.out(negative),
                  latent_image=wf.out(latent), **s)
    theirs = wf.add("KSampler", model=wf.out(comfy_model), positive=wf.out(positive), negative=wf.out(negative),
                    latent_image=wf.out(latent), **s)
    return wf.save_latent(ours, f"{label}_xdit"), wf.save_latent(theirs, f"{label}_comfy")


# --- the server -------------------------------------------------------------------------------------------

class PromptFailed(RuntimeError):
    """A prompt ComfyUI refused (node_errors) or that failed while executing; .entry is its history entry."""

    def __init__(self, message: str, entry: dict | None = None, response: dict | None = None):
        super().__init__(message)
        self.entry, self.response = entry, response


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, int]:
    """pid -> parent pid of every process we can see (from /proc)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    out[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    parents = _children()
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def pool_ranks(server_pid: int) -> list[int]:
    """Pids of the pack's worker ranks (`python -m worker`, started by torchrun) under the server process."""
    ranks = []
    for pid in descendants(server_pid):
        args = _cmdline(pid)
        if "torch.distributed.run" not in args and any(a == "-m" and b == "worker" for a, b in zip(args, args[1:])):
            ranks.append(pid)
    return sorted(ranks)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class ComfyServer:
    """One ComfyUI process: `python main.py --cpu --listen 127.0.0.1 --port P --base-directory BASE` with
    CXD_DEVICE=cpu (the pack's pool runs CPU ranks over gloo)."""

    comfyui: str
    python: str
    base: str
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: str = ""
    client_id: str = field(default_factory=lambda: "cxd-tests-" + uuid.uuid4().hex[:8])
    seen_pids: set = field(default_factory=set)  # every process the server started (pool launcher, ranks)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "ComfyServer":
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process (returns at once; wait_ready() waits for it to answer)."""
        self.port = self.port or free_port()
        self.log_path = os.path.join(self.base, "comfyui.log")
        env = dict(os.environ, CXD_DEVICE="cpu", PYTHONUNBUFFERED="1")
        for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"):
            env.pop(k, None)
        database = "sqlite:///" + os.path.join(self.base, "user", "comfyui.db")  # the default lives in ComfyUI/
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base, "--disable-auto-launch", "--database-url", database]
        os.makedirs(os.path.join(self.base, "user"), exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180) -> "ComfyServer":
        """Until /object_info answers with the pack's nodes; raises with the server's log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                info = self.get("/object_info/XDiTSampler", timeout=10)
            except (urllib.error.URLError, ConnectionError, OSError):
                info = None
            if info is not None:
                if "XDiTSampler" not in info:
                    raise RuntimeError(f"ComfyUI is up but the pack's nodes are missing:\n{self.log_tail()}")
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 200) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def _remember_children(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.seen_pids.update(descendants(self.proc.pid))

    def stop(self, grace: float = 20) -> list[int]:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the pids of the server's descendants (pool
        launcher, worker ranks) still alive 10 s after it is gone (none expected: the workers watch it)."""
        if self.proc is None:
            return []
        self._remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while True:
            left = [p for p in sorted(self.seen_pids) if _alive(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    # --- HTTP -----------------------------------------------------------------------------------------

    def request(self, path: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str, timeout: float = 30):
        return self.request(path, None, timeout)

    def submit(self, prompt: dict) -> str:
        """Queue a prompt; returns its id. Raises PromptFailed with ComfyUI's node errors when it is refused."""
        try:
            reply = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                detail = json.loads(body)
            except ValueError:
                detail = {"error": body}
            raise PromptFailed(f"ComfyUI refused the prompt ({e.code}): "
                               f"{json.dumps(detail.get('error'))} node errors: "
                               f"{json.dumps(detail.get('node_errors'))[:4000]}", response=detail) from None
        if reply.get("node_errors"):
            raise PromptFailed(f"node errors: {json.dumps(reply['node_errors'])[:4000]}", response=reply)
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while True:
            self._remember_children()
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (exit {self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue: "
                                   f"{json.dumps(self.get('/queue'))[:500]}\n{self.log_tail(60)}")
            time.sleep(0.25)

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Submit, wait, and return the history entry; raises PromptFailed with the execution error (node,
        exception type and message) when it failed."""
        entry = self.wait(self.submit(prompt), timeout)
        if entry["status"].get("status_str") != "success":
            raise PromptFailed(f"prompt failed: {execution_error(entry) or json.dumps(entry['status'])[:4000]}"
                               f"\n--- end of ComfyUI's log ---\n{self.log_tail(40)}", entry=entry)
        return entry

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def queue(self) -> dict:
        return self.get("/queue")

    def outputs(self, entry: dict, node_id: str, kind: str = "images") -> list[str]:
        """Paths of the files node `node_id` saved in this history entry (kind: its output key)."""
        items = entry.get("outputs", {}).get(node_id, {}).get(kind, [])
        return [os.path.join(self.base, i.get("type", "output"), i.get("subfolder", ""), i["filename"]) for i in items]

    def latent(self, entry: dict, node_id: str):
        """The LATENT a SaveLatent node `node_id` wrote in this history entry, as a float32 tensor."""
        from safetensors.torch import load_file

        items = entry.get("outputs", {}).get(node_id, {}).get("latents", [])
        if not items:
            raise KeyError(f"node {node_id} saved no latent; outputs: {sorted(entry.get('outputs', {}))}")
        item = items[0]
        path = os.path.join(self.base, item.get("type", "output"), item.get("subfolder", ""), item["filename"])
        return load_file(path)["latent_tensor"].float()


class Events:
    """ComfyUI's websocket messages for this server's client id (progress, executing, execution_*), collected in a
    background thread while the context is open (aiohttp, from requirements-dev.txt):

        with Events(comfy) as events:
            prompt_id = comfy.submit(wf)
            events.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] >= 3, timeout=60)
    """

    def __init__(self, server: "ComfyServer"):
        self.server, self.messages, self._stop = server, [], None
        self._ready, self._error = None, None

    def __enter__(self) -> "Events":
        import asyncio
        import threading

        self._ready = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def listen():
            import aiohttp

            stop = asyncio.Event()
            self._stop = stop
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(f"ws://127.0.0.1:{self.server.port}/ws?clientId="
                                                  f"{self.server.client_id}", heartbeat=20) as ws:
                        self._ready.set()
                        while not stop.is_set():
                            try:
                                msg = await asyncio.wait_for(ws.receive(), 0.2)
                            except asyncio.TimeoutError:
                                continue
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                self.messages.append(json.loads(msg.data))
                            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                break
            except Exception as e:  # reported by wait_for
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=loop.run_until_complete, args=(listen(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"cannot open ComfyUI's websocket: {self._error}")
        return self

    def wait_for(self, predicate, timeout: float) -> dict:
        """The first message (a dict with 'type' and 'data') for which predicate is true; TimeoutError if none."""
        deadline, seen = time.monotonic() + timeout, 0
        while True:
            while seen < len(self.messages):
                seen += 1
                if predicate(self.messages[seen - 1]):
                    return self.messages[seen - 1]
            if self._error is not None:
                raise RuntimeError(f"ComfyUI's websocket failed: {self._error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no such websocket message within {timeout:.0f} s; last ones: "
                                   f"{json.dumps(self.messages[-5:])[:1000]}")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def execution_error(entry: dict) -> str:
    """The execution_error (or execution_interrupted) message of a history entry, as one line; '' if none."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at {data.get('node_type')} (node {data.get('node_id')})"
    return ""


def python_info(python: str) -> str:
    """torch / torchvision versions of ComfyUI's Python (for skip reasons and reports)."""
    try:
        return subprocess.run([python, "-c", "import torch, torchvision; print(torch.__version__, "
                               "torchvision.__version__)"], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)


__all__ = ["CLIP_L", "Common", "ComfyServer", "FLUX", "FLUX_LORA", "IMAGE", "PIXART_ALPHA", "PIXART_SIGMA",
           "PromptFailed", "QWEN", "QWEN_FP8", "QWEN_TEXT", "QWEN_TEXT_LENGTHS", "SD3", "SD3_LORA", "SDXL_VAE",
           "TEST_NODES", "VAE", "WAN_HIGH", "WAN_I2V", "WAN_LOW",
           "WAN_VAE", "Events", "Workflow", "common_nodes", "descendants", "execution_error", "find_comfyui",
           "find_comfyui_python", "pool_ranks", "rel_l2", "sampler_pair", "write_models", "write_test_nodes",
           "xdit_loader"]
if __name__ == "__main__":  # write the models (and the test nodes) somewhere, for trying by hand
    sys.path.insert(0, REPO)
    write_test_nodes(sys.argv[1])
    print(write_models(sys.argv[1]))


def without_outputs(wf: Workflow, outputs: list[str]) -> Workflow:
    """The prompt without those Save* nodes and what only they need."""
    keep, todo = set(), [n for n, node in wf.items() if n not in outputs and node["class_type"].startswith("Save")]
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo += [v[0] for v in wf[n]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return Workflow({n: node for n, node in wf.items() if n in keep})


def unload_pool(comfy) -> None:
    """The pool's models unloaded (a module that loads large ones leaves the later modules their memory)."""
    try:
        comfy.request("/xdit/unload", {}, timeout=60)
    except OSError as e:  # not worth failing a test for: the next restart frees them too
        sys.stderr.write(f"[comfyui] could not unload the pool's models: {e}\n")
