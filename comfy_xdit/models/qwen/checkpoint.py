"""Load Qwen-Image transformer single-file checkpoints into diffusers' QwenImageTransformer2DModel.

Qwen-Image was released in diffusers' names (``transformer_blocks.N.attn.to_q.weight``, ``img_mod.1``,
``txt_norm``), and ComfyUI's repackaged files (qwen_image_bf16, qwen_image_fp8_e4m3fn, the fp8_scaled ones)
keep them, bare or under ComfyUI's ``model.diffusion_model.`` prefix, so no renaming is needed. Storage bf16 /
fp16 / fp32 / fp8_e4m3fn, and ComfyUI's scaled fp8 (a ``scaled_fp8`` marker and per-Linear ``scale_weight``),
dequantised on the way in. The config comes from tensor shapes only, checked on a meta-built model before any
tensor is read; a PipeFusion stage reads only its own blocks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..blocks import BlockLayout
from ..checkpoint import (COMFY_PREFIX, CheckpointError, assign_state_dict, checked_meta_model, diffusion_model_keys,
                          guess_content, key_sample, meta_shapes, num_blocks, read_header, read_tensors,
                          resident_dtypes, scaled_fp8_keys, scaled_fp8_state_dict, stored_dtypes, with_path)

# the time embedder stays on every PipeFusion stage (each block is modulated by it); the image and text input
# projections run on the first stage only
QWEN_BLOCKS = BlockLayout(containers=("transformer_blocks",), embedders=("img_in", "txt_norm", "txt_in"),
                          head=("norm_out", "proj_out"))
QWEN_EXPECTED = "a Qwen-Image transformer checkpoint"
LAYOUTS = ("diffusers", "comfy")
ROPE_AXES = {128: (16, 56, 56)}  # head size -> the (frame, row, col) RoPE split Qwen-Image uses (ComfyUI's too)
VARIANTS = {(3072, 60): "qwen-image"}


@dataclass
class QwenCheckpointInfo:
    path: str
    layout: str               # "diffusers" (Qwen-Image's own names, as ComfyUI ships them too)
    config: dict              # QwenImageTransformer2DModel kwargs
    stored_dtypes: set = field(default_factory=set)
    variant: str = "qwen-image"
    scaled_fp8: bool = False  # ComfyUI's scaled fp8: weights were dequantised (stored * scale_weight)


def detect_qwen_layout(keys) -> str | None:
    """'diffusers' for a Qwen-Image transformer's (prefix-stripped) keys, None for anything else."""
    keys = set(keys)
    if "txt_norm.weight" not in keys or "img_in.weight" not in keys:
        return None
    if any(re.match(r"transformer_blocks\.\d+\.img_mod\.1\.weight$", k) for k in keys):
        return "diffusers"
    return None


def _shape(shapes: dict, key: str, ndim: int) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"key '{key}' missing; needed to infer the Qwen-Image model size")
    shape = tuple(shapes[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"'{key}' has shape {shape}; expected a {ndim}-d tensor for a Qwen-Image transformer")
    return shape


def qwen_config_from_shapes(shapes: dict) -> dict:
    """QwenImageTransformer2DModel kwargs from tensor shapes (meta tensors do)."""
    if "time_text_embed.addition_t_embedding.weight" in shapes:
        raise CheckpointError("this is a Qwen-Image-Layered transformer (it has an additional timestep "
                              "condition), which this pack does not run yet; Qwen-Image and Qwen-Image-Edit are "
                              "supported")
    inner, in_channels = _shape(shapes, "img_in.weight", 2)
    head = _shape(shapes, "transformer_blocks.0.attn.norm_q.weight", 1)[0]
    if head not in ROPE_AXES:
        raise CheckpointError(f"attention head size {head}; Qwen-Image's RoPE is defined for heads of "
                              f"{', '.join(map(str, ROPE_AXES))}")
    if inner % head:
        raise CheckpointError(f"width {inner} is not a multiple of the attention head size {head}")
    patch = 2  # as ComfyUI assumes: 16 latent channels in 2x2 patches make img_in's 64 inputs
    out = _shape(shapes, "proj_out.weight", 2)[0]
    if out % (patch * patch) or in_channels % (patch * patch):
        raise CheckpointError(f"img_in takes {in_channels} and proj_out gives {out} values per token; "
                              f"expected multiples of {patch * patch} (2x2 patches)")
    return dict(patch_size=patch, in_channels=in_channels, out_channels=out // (patch * patch),
                num_layers=num_blocks(shapes, "transformer_blocks."), attention_head_dim=head,
                num_attention_heads=inner // head, joint_attention_dim=_shape(shapes, "txt_in.weight", 2)[1],
                guidance_embeds=False, axes_dims_rope=ROPE_AXES[head])


def qwen_variant(config: dict) -> str:
    key = (config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"])
    return VARIANTS.get(key, "qwen-image")


def read_qwen_info(path) -> QwenCheckpointInfo:
    """Layout, config, variant and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, QWEN_EXPECTED)
    keys, prefix = diffusion_model_keys(header)
    keys, scales = scaled_fp8_keys(keys)
    shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
    layout = detect_qwen_layout(shapes)
    if layout is None:
        if not shapes:
            raise CheckpointError(f"contains no tensors; expected {QWEN_EXPECTED}")
        raise CheckpointError("does not look like a Qwen-Image transformer: no 'txt_norm.weight', 'img_in.weight' "
                              f"and 'transformer_blocks.N.img_mod.1.weight' keys (found keys like "
                              f"{key_sample(shapes)}); {guess_content(shapes)}")
    config = qwen_config_from_shapes(shapes)
    info = QwenCheckpointInfo(path=path, layout=layout, config=config, variant=qwen_variant(config),
                              stored_dtypes=stored_dtypes(header, keys), scaled_fp8=bool(scales))
    return info, prefix, shapes, scales


def load_qwen_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None, progress=None):
    """Load a Qwen-Image transformer file; returns (QwenImageTransformer2DModel in eval mode, QwenCheckpointInfo).

    fp8: the blocks' Linear weights kept in float8_e4m3fn (models/fp8.py; a scaled-fp8 file's weights are
    dequantised first). stage: (start, stop), a PipeFusion block range; only its tensors are read.
    progress(bytes read, bytes to read) after each tensor."""
    from diffusers import QwenImageTransformer2DModel

    path = os.fspath(path)
    try:
        info, prefix, shapes, scales = _inspect(path)
        model = checked_meta_model(QwenImageTransformer2DModel, info.config, shapes, "Qwen-Image")
        QWEN_BLOCKS.make_resident(model, stage, fp8)
        reads = {prefix + k: t for k, t in resident_dtypes(model, dtype).items()}
        sd = read_tensors(path, list(reads), dtype=reads, device=device, progress=progress, expected=QWEN_EXPECTED,
                          scales=scales)
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    except CheckpointError as e:
        raise with_path(path, e) from e
    return real_rope(assign_state_dict(model, sd, path)), info


def real_rope(model):
    """diffusers' RoPE tables are plain attributes, not buffers: a model built on the meta device has none.
    This pack's forward computes ComfyUI's ids and never reads them; diffusers' own forward does, so the model
    gets real ones (CPU tensors; diffusers moves them to the input's device per call)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    return model


def write_qwen_checkpoint(model, path, layout: str = "diffusers", dtype=None, scaled_fp8: bool = False):
    """Save ``model`` as one file: 'diffusers' (Qwen-Image's own names, as ComfyUI's repackaged files) or
    'comfy' (those under model.diffusion_model.). scaled_fp8: as ComfyUI's scaled-fp8 files
    (scaled_fp8_state_dict)."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if scaled_fp8:
        out = scaled_fp8_state_dict(model, dtype)
    else:
        out = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    save_file({prefix + k: v.contiguous().clone() for k, v in out.items()}, os.fspath(path))
    return path
