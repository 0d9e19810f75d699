"""Try the pack in a real, running ComfyUI without downloading weights.

    python scripts/try_in_comfyui.py --comfyui PATH/TO/ComfyUI [--url http://127.0.0.1:8188] [--gpus 2]
                                     [--strategy manual --set pipefusion_degree=2 --set warmup_steps=6] [--set compile=true]

    python scripts/try_in_comfyui.py --comfyui PATH/TO/ComfyUI --family sd3 [--strategy cfg_parallel]

Run it with ComfyUI's Python (it needs transformers, which ComfyUI requires). It writes small
random-weight models into ComfyUI's models folders (a Flux-shaped transformer whose text
width is CLIP-L's 768; an SD3.5-Medium-shaped one as an all-in-one SAI checkpoint; a 16-channel
VAE; a CLIP-L text encoder), then posts an API-format workflow to /prompt:
- flux: CLIPLoader -> CLIPTextEncode -> FluxGuidance -> Sampler (xDiT) -> VAE Decode (xDiT) -> SaveImage,
  plus ComfyUI's own VAEDecode of the same LATENT;
- sd3: CLIPLoader (type sd3: CLIP-L alone, padded to SD3's widths as ComfyUI does) -> positive and negative
  CLIPTextEncode -> Load Diffusion Model (xDiT) -> Sampler (xDiT) at cfg 4.5 -> VAE Decode (xDiT) -> SaveImage,
  and beside it ComfyUI's own UNETLoader -> KSampler on the same file, settings and seed; both LATENTs are
  saved and the script prints how far apart they are.
It waits for the result and prints the saved files. The images are noise (random weights); the point is
the plumbing. Real Flux and SD3 need T5-XXL, which is too large to fake here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _value(text: str):
    """A loader input from the command line: true/false for BOOLEAN inputs, else an INT."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text)


def write_models(comfyui: str) -> None:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy_xdit.models.flux.checkpoint import write_flux_checkpoint
    from comfy_xdit.models.flux.random import flux_config, random_flux
    from comfy_xdit.models.sd3.checkpoint import write_sd3_checkpoint
    from comfy_xdit.models.sd3.random import random_sd3, sd3_config
    from comfy_xdit.vae.loader import write_vae_checkpoint

    models = os.path.join(comfyui, "models")
    for sub in ("diffusion_models", "vae", "text_encoders"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)
    flux = random_flux(flux_config("tiny", joint_attention_dim=768, pooled_projection_dim=768), seed=0)
    write_flux_checkpoint(flux, os.path.join(models, "diffusion_models", "xdit_tiny_flux.safetensors"),
                          layout="comfy")
    # ComfyUI's SD3 text encoders give [B, T, 4096] and pooled [B, 2048] whichever of CLIP-L/G and T5 load
    sd3 = random_sd3(sd3_config("tiny-sd3.5-medium", joint_attention_dim=4096, pooled_projection_dim=2048), seed=0)
    write_sd3_checkpoint(sd3, os.path.join(models, "diffusion_models", "xdit_tiny_sd35.safetensors"), layout="full")
    torch.manual_seed(0)
    # Real Flux VAE shapes: ComfyUI's own VAE loader assumes a 128-channel first level.
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    write_vae_checkpoint(vae, os.path.join(models, "vae", "xdit_tiny_ae.safetensors"), layout="ldm")
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768, max_position_embeddings=77))
    from safetensors.torch import save_file
    # ComfyUI expects the original CLIP names (text_model.*); newer transformers drop the prefix
    weights = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous()
               for k, v in clip.state_dict().items()}
    weights["text_projection.weight"] = torch.eye(768)
    save_file(weights,
              os.path.join(models, "text_encoders", "xdit_random_clip_l.safetensors"))


def workflow(gpus: int, strategy: str = "auto", loader_inputs: dict | None = None) -> dict:
    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    return {
        "1": node("CLIPLoader", clip_name="xdit_random_clip_l.safetensors", type="stable_diffusion"),
        "2": node("CLIPTextEncode", text="a lighthouse on a cliff", clip=["1", 0]),
        "3": node("FluxGuidance", guidance=3.5, conditioning=["2", 0]),
        "4": node("XDiTModelLoader", unet_name="xdit_tiny_flux.safetensors", weight_dtype="fp32", gpus=gpus,
                  strategy=strategy, **(loader_inputs or {})),
        "5": node("EmptySD3LatentImage", width=256, height=192, batch_size=1),
        "6": node("XDiTSampler", model=["4", 0], positive=["3", 0], negative=["2", 0], latent_image=["5", 0],
                  seed=7, steps=6, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0),
        "7": node("XDiTVAELoader", vae_name="xdit_tiny_ae.safetensors", gpus=gpus),
        "8": node("XDiTVAEDecode", samples=["6", 0], vae=["7", 0]),
        "9": node("SaveImage", images=["8", 0], filename_prefix="xdit_try"),
        "10": node("VAELoader", vae_name="xdit_tiny_ae.safetensors"),
        "11": node("VAEDecode", samples=["6", 0], vae=["10", 0]),
        "12": node("SaveImage", images=["11", 0], filename_prefix="xdit_try_comfy_vae"),
    }


def sd3_workflow(gpus: int, strategy: str = "auto", loader_inputs: dict | None = None) -> dict:
    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    sampling = dict(seed=7, steps=6, cfg=4.5, sampler_name="euler", scheduler="simple", denoise=1.0)
    return {
        "1": node("CLIPLoader", clip_name="xdit_random_clip_l.safetensors", type="sd3"),
        "2": node("CLIPTextEncode", text="a lighthouse on a cliff", clip=["1", 0]),
        "3": node("CLIPTextEncode", text="blurry", clip=["1", 0]),
        "4": node("XDiTModelLoader", unet_name="xdit_tiny_sd35.safetensors", weight_dtype="fp32", gpus=gpus,
                  strategy=strategy, **(loader_inputs or {})),
        "5": node("EmptySD3LatentImage", width=256, height=192, batch_size=1),
        "6": node("XDiTSampler", model=["4", 0], positive=["2", 0], negative=["3", 0], latent_image=["5", 0],
                  **sampling),
        "7": node("XDiTVAELoader", vae_name="xdit_tiny_ae.safetensors", gpus=gpus),
        "8": node("XDiTVAEDecode", samples=["6", 0], vae=["7", 0]),
        "9": node("SaveImage", images=["8", 0], filename_prefix="xdit_try_sd3"),
        "10": node("UNETLoader", unet_name="xdit_tiny_sd35.safetensors", weight_dtype="default"),
        "11": node("KSampler", model=["10", 0], positive=["2", 0], negative=["3", 0], latent_image=["5", 0],
                   **sampling),
        "12": node("SaveLatent", samples=["6", 0], filename_prefix="xdit_try_sd3_xdit"),
        "13": node("SaveLatent", samples=["11", 0], filename_prefix="xdit_try_sd3_ksampler"),
    }


def _compare_latents(comfyui: str, outputs: dict) -> None:
    """The Sampler (xDiT)'s LATENT against KSampler's, as saved by the two SaveLatent nodes."""
    from safetensors.torch import load_file

    files = {node: os.path.join(comfyui, "output", item.get("subfolder", ""), item["filename"])
             for node, out in outputs.items() if node in ("12", "13") for item in out.get("latents", [])}
    if set(files) != {"12", "13"}:
        print("latents not found in the outputs:", sorted(files))
        return
    ours, theirs = (load_file(files[n])["latent_tensor"].float() for n in ("12", "13"))
    print(f"Sampler (xDiT) vs KSampler latent: relative L2 {float((ours - theirs).norm() / theirs.norm()):.2e}, "
          f"max |a-b| {float((ours - theirs).abs().max()):.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--family", default="flux", choices=["flux", "sd3"])
    parser.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE",
                        help="an optional loader input, e.g. pipefusion_degree=2 or compile=true (repeatable)")
    args = parser.parse_args()
    loader_inputs = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    if not args.skip_models:
        write_models(args.comfyui)
    build = sd3_workflow if args.family == "sd3" else workflow
    body = json.dumps({"prompt": build(args.gpus, args.strategy, loader_inputs), "client_id": "xdit-try"}).encode()
    request = urllib.request.Request(args.url + "/prompt", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        prompt_id = json.load(r)["prompt_id"]
    print("queued", prompt_id)
    for _ in range(600):
        with urllib.request.urlopen(f"{args.url}/history/{prompt_id}", timeout=30) as r:
            history = json.load(r)
        if prompt_id in history:
            entry = history[prompt_id]
            print("status:", json.dumps(entry["status"])[:2000])
            for node_id, out in entry.get("outputs", {}).items():
                for image in out.get("images", []) + out.get("latents", []):
                    print(f"node {node_id} saved output/{image.get('subfolder', '')}/{image['filename']}")
            if args.family == "sd3":
                _compare_latents(args.comfyui, entry.get("outputs", {}))
            return 0 if entry["status"].get("status_str") == "success" else 1
        time.sleep(1)
    print("timed out waiting for the prompt")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
