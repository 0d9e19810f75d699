"""Writes example_workflows/: each Flux, SD3, Wan, Qwen-Image and PixArt workflow in ComfyUI's UI format (for the template
browser and drag-and-drop) and in API format (for POST /prompt), from one description so
the two never drift apart.

    python scripts/make_example_workflows.py
"""

from __future__ import annotations

import json
import os

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")

# node id -> (class, widget values in widget order, {input name: (source id, output slot, type)}, outputs)
# Widget order is the order of a node's widget inputs; a seed with control_after_generate
# carries its control value ("fixed") right after it in the UI format only.
TXT2IMG = {
    1: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                           "type": "flux", "device": "default"}, {}, [("CLIP", "CLIP")]),
    2: ("CLIPTextEncode", {"text": "a red fox in a snowy forest at dawn, photograph"},
        {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    3: ("FluxGuidance", {"guidance": 3.5}, {"conditioning": (2, 0, "CONDITIONING")},
        [("CONDITIONING", "CONDITIONING")]),
    4: ("CLIPTextEncode", {"text": ""}, {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    5: ("XDiTModelLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "bf16", "gpus": 2,
                            "strategy": "auto", "ulysses_degree": 1, "ring_degree": 1}, {},
        [("XDIT_MODEL", "XDIT_MODEL")]),
    6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, [("LATENT", "LATENT")]),
    7: ("XDiTSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                        "denoise": 1.0},
        {"model": (5, 0, "XDIT_MODEL"), "positive": (3, 0, "CONDITIONING"), "negative": (4, 0, "CONDITIONING"),
         "latent_image": (6, 0, "LATENT")}, [("LATENT", "LATENT")]),
    8: ("XDiTVAELoader", {"vae_name": "ae.safetensors", "gpus": 2}, {}, [("XDIT_VAE", "XDIT_VAE")]),
    9: ("XDiTVAEDecode", {}, {"samples": (7, 0, "LATENT"), "vae": (8, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")]),
    10: ("SaveImage", {"filename_prefix": "xdit_flux"}, {"images": (9, 0, "IMAGE")}, []),
}


def with_lora(base: dict) -> dict:
    wf = dict(base)
    wf[11] = ("XDiTLoraLoader", {"lora_name": "flux_lora.safetensors", "strength_model": 0.8},
              {"model": (5, 0, "XDIT_MODEL")}, [("XDIT_MODEL", "XDIT_MODEL")])
    cls, widgets, inputs, outputs = wf[7]
    wf[7] = (cls, widgets, dict(inputs, model=(11, 0, "XDIT_MODEL")), outputs)
    return wf


def with_controlnet(base: dict) -> dict:
    wf = dict(base)
    wf[12] = ("XDiTControlNetLoader", {"control_net_name": "FLUX.1-dev-ControlNet-Union-Pro.safetensors"}, {},
              [("XDIT_CONTROLNET", "XDIT_CONTROLNET")])
    wf[13] = ("LoadImage", {"image": "example.png", "upload": "image"}, {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")])
    wf[14] = ("XDiTApplyControlNet", {"strength": 0.7, "start_percent": 0.0, "end_percent": 0.6, "union_mode": 0},
              {"positive": (3, 0, "CONDITIONING"), "negative": (4, 0, "CONDITIONING"),
               "control_net": (12, 0, "XDIT_CONTROLNET"), "image": (13, 0, "IMAGE"), "vae": (8, 0, "XDIT_VAE")},
              [("positive", "CONDITIONING"), ("negative", "CONDITIONING")])
    cls, widgets, inputs, outputs = wf[7]
    wf[7] = (cls, widgets, dict(inputs, positive=(14, 0, "CONDITIONING"), negative=(14, 1, "CONDITIONING")), outputs)
    return wf


def with_comfy_sampler(base: dict) -> dict:
    """The same model driven by ComfyUI's own KSampler through xDiT Model to MODEL (every model call runs on
    the pool), with ComfyUI's ModelSamplingFlux on the MODEL."""
    wf = dict(base)
    wf[15] = ("XDiTModelToComfy", {}, {"model": (5, 0, "XDIT_MODEL")}, [("MODEL", "MODEL")])
    wf[16] = ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024},
              {"model": (15, 0, "MODEL")}, [("MODEL", "MODEL")])
    wf[7] = ("KSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                          "denoise": 1.0},
             {"model": (16, 0, "MODEL"), "positive": (3, 0, "CONDITIONING"), "negative": (4, 0, "CONDITIONING"),
              "latent_image": (6, 0, "LATENT")}, [("LATENT", "LATENT")])
    return wf


SD3_TXT2IMG = {  # SD3.5 Large at cfg 4.5: cfg parallel is its main win on 2 GPUs ("auto" picks USP)
    1: ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                             "clip_name3": "t5xxl_fp16.safetensors"}, {}, [("CLIP", "CLIP")]),
    2: ("CLIPTextEncode", {"text": "a red fox in a snowy forest at dawn, photograph"},
        {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    3: ("CLIPTextEncode", {"text": "blurry, low quality"}, {"clip": (1, 0, "CLIP")},
        [("CONDITIONING", "CONDITIONING")]),
    4: ("XDiTModelLoader", {"unet_name": "sd3.5_large.safetensors", "weight_dtype": "bf16", "gpus": 2,
                            "strategy": "cfg_parallel", "ulysses_degree": 1, "ring_degree": 1}, {},
        [("XDIT_MODEL", "XDIT_MODEL")]),
    5: ("XDiTModelSamplingSD3", {"shift": 3.0}, {"model": (4, 0, "XDIT_MODEL")}, [("XDIT_MODEL", "XDIT_MODEL")]),
    6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, [("LATENT", "LATENT")]),
    7: ("XDiTSampler", {"seed": 42, "steps": 28, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple",
                        "denoise": 1.0},
        {"model": (5, 0, "XDIT_MODEL"), "positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING"),
         "latent_image": (6, 0, "LATENT")}, [("LATENT", "LATENT")]),
    8: ("XDiTVAELoader", {"vae_name": "sd3_vae.safetensors", "gpus": 2}, {}, [("XDIT_VAE", "XDIT_VAE")]),
    9: ("XDiTVAEDecode", {}, {"samples": (7, 0, "LATENT"), "vae": (8, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")]),
    10: ("SaveImage", {"filename_prefix": "xdit_sd3"}, {"images": (9, 0, "IMAGE")}, []),
}

NEGATIVE_WAN = "static, blurry, low quality, jpeg artifacts, deformed, still picture, overexposed"
WAN_T2V = {  # Wan 2.1 T2V 14B at 832x480, 81 frames, cfg 5 with a negative prompt: "auto" picks cfg parallel
    1: ("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"},
        {}, [("CLIP", "CLIP")]),
    2: ("CLIPTextEncode", {"text": "a red fox trotting through fresh snow in a pine forest, morning light"},
        {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    3: ("CLIPTextEncode", {"text": NEGATIVE_WAN}, {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    4: ("XDiTModelLoader", {"unet_name": "wan2.1_t2v_14B_bf16.safetensors", "weight_dtype": "bf16", "gpus": 2,
                            "strategy": "auto", "ulysses_degree": 1, "ring_degree": 1}, {},
        [("XDIT_MODEL", "XDIT_MODEL")]),
    5: ("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1}, {},
        [("LATENT", "LATENT")]),
    6: ("XDiTSampler", {"seed": 42, "steps": 30, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
                        "denoise": 1.0},
        {"model": (4, 0, "XDIT_MODEL"), "positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING"),
         "latent_image": (5, 0, "LATENT")}, [("LATENT", "LATENT")]),
    7: ("XDiTVAELoader", {"vae_name": "wan_2.1_vae.safetensors", "gpus": 2}, {}, [("XDIT_VAE", "XDIT_VAE")]),
    8: ("XDiTVAEDecode", {}, {"samples": (6, 0, "LATENT"), "vae": (7, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")]),
    9: ("SaveWEBM", {"filename_prefix": "xdit_wan", "codec": "vp9", "fps": 16.0, "crf": 32.0},
        {"images": (8, 0, "IMAGE")}, []),
}


def wan_i2v(base: dict) -> dict:
    """Wan 2.1 I2V 14B: ComfyUI's CLIP vision and WanImageToVideo (its VAE encodes the start frame) make the
    conditioning and the latent; the pool samples and decodes."""
    wf = dict(base)
    wf[4] = ("XDiTModelLoader", dict(base[4][1], unet_name="wan2.1_i2v_480p_14B_bf16.safetensors"), {},
             base[4][3])
    wf[10] = ("CLIPVisionLoader", {"clip_name": "clip_vision_h.safetensors"}, {}, [("CLIP_VISION", "CLIP_VISION")])
    wf[11] = ("LoadImage", {"image": "example.png", "upload": "image"}, {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")])
    wf[12] = ("CLIPVisionEncode", {"crop": "none"}, {"clip_vision": (10, 0, "CLIP_VISION"), "image": (11, 0, "IMAGE")},
              [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")])
    wf[13] = ("VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}, {}, [("VAE", "VAE")])
    wf[5] = ("WanImageToVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1},
             {"positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING"), "vae": (13, 0, "VAE"),
              "clip_vision_output": (12, 0, "CLIP_VISION_OUTPUT"), "start_image": (11, 0, "IMAGE")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")])
    cls, widgets, inputs, outputs = base[6]
    wf[6] = (cls, widgets, dict(inputs, positive=(5, 0, "CONDITIONING"), negative=(5, 1, "CONDITIONING"),
                                latent_image=(5, 2, "LATENT")), outputs)
    return wf


def wan22_two_experts(base: dict) -> dict:
    """Wan 2.2 T2V A14B: the high-noise expert for the first half of the steps, handing its leftover noise to
    the low-noise expert for the rest (ComfyUI's template does it with two KSamplerAdvanced); both stay
    resident in the workers."""
    wf = dict(base)
    wf[4] = ("XDiTModelLoader", dict(base[4][1], unet_name="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                                     weight_dtype="fp8_e4m3fn"), {}, base[4][3])
    wf[14] = ("XDiTModelLoader", dict(base[4][1], unet_name="wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                                      weight_dtype="fp8_e4m3fn"), {}, base[4][3])
    wf[15] = ("XDiTModelSamplingSD3", {"shift": 8.0}, {"model": (4, 0, "XDIT_MODEL")}, [("XDIT_MODEL", "XDIT_MODEL")])
    wf[16] = ("XDiTModelSamplingSD3", {"shift": 8.0}, {"model": (14, 0, "XDIT_MODEL")},
              [("XDIT_MODEL", "XDIT_MODEL")])
    common = {"positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING")}
    settings = {"seed": 42, "steps": 20, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    wf[6] = ("XDiTSampler", dict(settings, add_noise="enable", start_at_step=0, end_at_step=10,
                                 return_with_leftover_noise="enable"),
             dict(common, model=(15, 0, "XDIT_MODEL"), latent_image=(5, 0, "LATENT")), [("LATENT", "LATENT")])
    wf[17] = ("XDiTSampler", dict(settings, add_noise="disable", start_at_step=10, end_at_step=10000,
                                  return_with_leftover_noise="disable"),
              dict(common, model=(16, 0, "XDIT_MODEL"), latent_image=(6, 0, "LATENT")), [("LATENT", "LATENT")])
    wf[8] = ("XDiTVAEDecode", {}, {"samples": (17, 0, "LATENT"), "vae": (7, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")])
    return wf


NEGATIVE_QWEN = "blurry, low quality, distorted text, extra limbs, watermark"
QWEN_IMAGE = {  # Qwen-Image (20B) at its native 1328x1328, cfg 4 with a negative prompt, 50 steps; the fp8 file
    # kept in fp8 (20 GB a GPU): on two 24 GB cards "auto" picks CFG parallel
    1: ("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image",
                       "device": "default"}, {}, [("CLIP", "CLIP")]),
    2: ("CLIPTextEncode", {"text": "a cozy bookshop on a rainy evening, warm light in the windows, a hand-painted "
                                   "sign that reads \"Open Late\", photograph"},
        {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    3: ("CLIPTextEncode", {"text": NEGATIVE_QWEN}, {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    4: ("XDiTModelLoader", {"unet_name": "qwen_image_fp8_e4m3fn.safetensors", "weight_dtype": "fp8_e4m3fn",
                            "gpus": 2, "strategy": "auto", "ulysses_degree": 1, "ring_degree": 1}, {},
        [("XDIT_MODEL", "XDIT_MODEL")]),
    # ComfyUI's Qwen-Image workflows put ModelSamplingAuraFlow 3.1 on the MODEL; on Qwen-Image this node does
    # the same (discrete flow, multiplier 1.0)
    5: ("XDiTModelSamplingSD3", {"shift": 3.1}, {"model": (4, 0, "XDIT_MODEL")}, [("XDIT_MODEL", "XDIT_MODEL")]),
    6: ("EmptySD3LatentImage", {"width": 1328, "height": 1328, "batch_size": 1}, {}, [("LATENT", "LATENT")]),
    7: ("XDiTSampler", {"seed": 42, "steps": 50, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                        "denoise": 1.0},
        {"model": (5, 0, "XDIT_MODEL"), "positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING"),
         "latent_image": (6, 0, "LATENT")}, [("LATENT", "LATENT")]),
    8: ("XDiTVAELoader", {"vae_name": "qwen_image_vae.safetensors", "gpus": 2}, {}, [("XDIT_VAE", "XDIT_VAE")]),
    9: ("XDiTVAEDecode", {}, {"samples": (7, 0, "LATENT"), "vae": (8, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")]),
    10: ("SaveImage", {"filename_prefix": "xdit_qwen_image"}, {"images": (9, 0, "IMAGE")}, []),
}


def qwen_image_edit(base: dict) -> dict:
    """Qwen-Image-Edit: ComfyUI's TextEncodeQwenImageEdit reads the picture with the text (Qwen2.5-VL) and adds
    its VAE latent as the reference for both prompts; ComfyUI's VAEEncode of the same picture, scaled to about
    1 megapixel, gives the latent's size; the pool samples and decodes."""
    wf = dict(base)
    wf[4] = ("XDiTModelLoader", dict(base[4][1], unet_name="qwen_image_edit_fp8_e4m3fn.safetensors"), {},
             base[4][3])
    wf[11] = ("LoadImage", {"image": "example.png", "upload": "image"}, {}, [("IMAGE", "IMAGE"), ("MASK", "MASK")])
    wf[12] = ("ImageScaleToTotalPixels", {"upscale_method": "lanczos", "megapixels": 1.0},
              {"image": (11, 0, "IMAGE")}, [("IMAGE", "IMAGE")])
    wf[13] = ("VAELoader", {"vae_name": "qwen_image_vae.safetensors"}, {}, [("VAE", "VAE")])
    wf[2] = ("TextEncodeQwenImageEdit", {"prompt": "make it a snowy winter evening, keep the sign and the shop"},
             {"clip": (1, 0, "CLIP"), "vae": (13, 0, "VAE"), "image": (12, 0, "IMAGE")},
             [("CONDITIONING", "CONDITIONING")])
    wf[3] = ("TextEncodeQwenImageEdit", {"prompt": NEGATIVE_QWEN},
             {"clip": (1, 0, "CLIP"), "vae": (13, 0, "VAE"), "image": (12, 0, "IMAGE")},
             [("CONDITIONING", "CONDITIONING")])
    wf[6] = ("VAEEncode", {}, {"pixels": (12, 0, "IMAGE"), "vae": (13, 0, "VAE")}, [("LATENT", "LATENT")])
    wf[10] = ("SaveImage", {"filename_prefix": "xdit_qwen_image_edit"}, {"images": (9, 0, "IMAGE")}, [])
    return wf


NEGATIVE_PIXART = "blurry, low quality, deformed, watermark, jpeg artifacts"
PIXART_SIGMA = {  # PixArt-Σ XL-2 2K at its native 2048x2048 (16384 image tokens), cfg 4.5 with a negative prompt;
    # ComfyUI's own T5-XXL (CLIPLoader type pixart) encodes, the pool samples (discrete eps, dpmpp_2m / karras)
    # and decodes with the SDXL VAE
    1: ("CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}, {},
        [("CLIP", "CLIP")]),
    2: ("CLIPTextEncode", {"text": "a lighthouse on a rocky coast at dusk, waves breaking, warm light in the "
                                   "windows, detailed oil painting"},
        {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    3: ("CLIPTextEncode", {"text": NEGATIVE_PIXART}, {"clip": (1, 0, "CLIP")}, [("CONDITIONING", "CONDITIONING")]),
    4: ("XDiTModelLoader", {"unet_name": "PixArt-Sigma-XL-2-2K-MS.safetensors", "weight_dtype": "bf16", "gpus": 2,
                            "strategy": "auto", "ulysses_degree": 1, "ring_degree": 1}, {},
        [("XDIT_MODEL", "XDIT_MODEL")]),
    5: ("EmptyLatentImage", {"width": 2048, "height": 2048, "batch_size": 1}, {}, [("LATENT", "LATENT")]),
    6: ("XDiTSampler", {"seed": 42, "steps": 20, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                        "denoise": 1.0},
        {"model": (4, 0, "XDIT_MODEL"), "positive": (2, 0, "CONDITIONING"), "negative": (3, 0, "CONDITIONING"),
         "latent_image": (5, 0, "LATENT")}, [("LATENT", "LATENT")]),
    7: ("XDiTVAELoader", {"vae_name": "sdxl_vae.safetensors", "gpus": 2}, {}, [("XDIT_VAE", "XDIT_VAE")]),
    8: ("XDiTVAEDecode", {}, {"samples": (6, 0, "LATENT"), "vae": (7, 0, "XDIT_VAE")}, [("IMAGE", "IMAGE")]),
    9: ("SaveImage", {"filename_prefix": "xdit_pixart_sigma"}, {"images": (8, 0, "IMAGE")}, []),
}


WORKFLOWS = {"flux_txt2img_xdit": TXT2IMG, "flux_lora_xdit": with_lora(TXT2IMG),
             "flux_controlnet_xdit": with_controlnet(TXT2IMG), "flux_ksampler_xdit_model": with_comfy_sampler(TXT2IMG),
             "sd3_txt2img_xdit": SD3_TXT2IMG, "wan21_t2v_xdit": WAN_T2V, "wan21_i2v_xdit": wan_i2v(WAN_T2V),
             "wan22_two_experts_xdit": wan22_two_experts(WAN_T2V), "qwen_image_xdit": QWEN_IMAGE,
             "qwen_image_edit_xdit": qwen_image_edit(QWEN_IMAGE), "pixart_sigma_xdit": PIXART_SIGMA}


UI_ONLY_WIDGETS = {"upload"}  # frontend buttons: in widgets_values, never in the API prompt


def to_api(wf: dict) -> dict:
    api = {}
    for node_id, (cls, widgets, inputs, _) in wf.items():
        values = {k: v for k, v in widgets.items() if k not in UI_ONLY_WIDGETS}
        values.update({name: [str(src), slot] for name, (src, slot, _) in inputs.items()})
        api[str(node_id)] = {"class_type": cls, "inputs": values}
    return api


def to_ui(wf: dict) -> dict:
    links, nodes = [], []
    incoming = {}
    for node_id, (_, _, inputs, _) in sorted(wf.items()):
        for name, (src, slot, kind) in inputs.items():
            links.append([len(links) + 1, src, slot, node_id, list(inputs).index(name), kind])
            incoming[(node_id, name)] = len(links)
    column_y: dict[int, int] = {}
    for order, (node_id, (cls, widgets, inputs, outputs)) in enumerate(sorted(wf.items())):
        column = order // 4
        height = 70 + 26 * (len(widgets) + len(inputs) + (1 if "seed" in widgets else 0)) + (140 if "upload" in widgets else 0)
        y = column_y.get(column, 60)
        column_y[column] = y + height + 50
        values = []
        for name, value in widgets.items():
            values.append(value)
            if name == "seed":
                values.append("fixed")
        nodes.append({
            "id": node_id, "type": cls, "pos": [60 + 340 * column, y],
            "size": [310, height], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": incoming[(node_id, name)]}
                       for name, (_, _, kind) in inputs.items()],
            "outputs": [{"name": name, "type": kind, "slot_index": slot,
                         "links": [link[0] for link in links if link[1] == node_id and link[2] == slot]}
                        for slot, (name, kind) in enumerate(outputs)],
            "properties": {"Node name for S&R": cls}, "widgets_values": values,
        })
    return {"last_node_id": max(wf), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, wf in WORKFLOWS.items():
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(to_ui(wf), f, indent=1)
        os.makedirs(os.path.join(OUT, "api"), exist_ok=True)
        with open(os.path.join(OUT, "api", f"{name}.json"), "w") as f:
            json.dump(to_api(wf), f, indent=1)


if __name__ == "__main__":
    main()
