"""Load Wan 2.1 / 2.2 transformer single-file checkpoints into diffusers' WanTransformer3DModel.

Accepted layouts: the original Wan keys (``blocks.N.self_attn.q.weight``, ``head.modulation``), as ComfyUI's
repackaged files ship them, also under ComfyUI's ``model.diffusion_model.`` prefix; and diffusers keys
(``blocks.N.attn1.to_q.weight``, ``scale_shift_table``). Storage bf16 / fp16 / fp32 / fp8_e4m3fn, and ComfyUI's
scaled fp8 (a ``scaled_fp8`` marker and per-Linear ``scale_weight``), which is dequantised on the way in.
The config comes from tensor shapes only; original -> diffusers is diffusers' own converter (a pure renaming),
run on meta tensors first so a bad file fails before anything is read, and so only the tensors a PipeFusion
stage keeps are read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from ..blocks import BlockLayout
from ..checkpoint import (COMFY_PREFIX, SCALED_FP8, CheckpointError, assign_state_dict, checked_meta_model,
                          diffusion_model_keys, guess_content, key_sample, meta_shapes, num_blocks, read_header,
                          read_tensors, resident_dtypes, scaled_fp8_keys, scaled_fp8_state_dict, stored_dtypes,
                          with_path)

# the time and text embedders stay on every PipeFusion stage: each block takes the timestep projection and
# cross-attends to the projected text
WAN_BLOCKS = BlockLayout(containers=("blocks",), embedders=("patch_embedding",), head=("norm_out", "proj_out"))
WAN_EXPECTED = "a Wan 2.1 / 2.2 transformer checkpoint"
HEAD_DIM = 128  # every Wan release; ComfyUI reads the head count as width // 128 too
LAYOUTS = ("wan", "comfy", "diffusers")
# (dim, in_channels, out_channels, image conditioning) -> release name; reduced test models get "wan"
VARIANTS = {(1536, 16, 16, False): "wan2.1-t2v-1.3b", (5120, 16, 16, False): "wan2.1-t2v-14b",
            (5120, 36, 16, True): "wan2.1-i2v-14b", (1536, 36, 16, True): "wan2.1-i2v-1.3b",
            (5120, 36, 16, False): "wan2.2-i2v-a14b", (3072, 48, 48, False): "wan2.2-ti2v-5b"}


@dataclass
class WanCheckpointInfo:
    path: str
    layout: str              # "wan" (original keys, with or without ComfyUI's prefix) or "diffusers"
    config: dict             # WanTransformer3DModel kwargs
    stored_dtypes: set = field(default_factory=set)
    variant: str = "wan"
    scaled_fp8: bool = False  # ComfyUI's scaled fp8: weights were dequantised (stored * scale_weight)


def detect_wan_layout(keys) -> str | None:
    """'wan' or 'diffusers' for a Wan transformer's (prefix-stripped) keys, None for anything else."""
    keys = set(keys)
    if "patch_embedding.weight" not in keys:
        return None
    if "head.modulation" in keys and any(re.match(r"blocks\.\d+\.self_attn\.q\.weight$", k) for k in keys):
        return "wan"
    if "scale_shift_table" in keys and any(re.match(r"blocks\.\d+\.attn1\.to_q\.weight$", k) for k in keys):
        return "diffusers"
    return None


def _shape(shapes: dict, key: str, ndim: int) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"key '{key}' missing; needed to infer the Wan model size")
    shape = tuple(shapes[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"'{key}' has shape {shape}; expected a {ndim}-d tensor for a Wan transformer")
    return shape


def wan_config_from_shapes(shapes: dict) -> dict:
    """WanTransformer3DModel kwargs from diffusers-named tensor shapes (meta tensors do)."""
    dim, in_channels, *patch = _shape(shapes, "patch_embedding.weight", 5)
    if dim % HEAD_DIM:
        raise CheckpointError(f"width {dim} is not a multiple of Wan's attention head size {HEAD_DIM}")
    out = _shape(shapes, "proj_out.weight", 2)[0]
    patch_numel = patch[0] * patch[1] * patch[2]
    if out % patch_numel:
        raise CheckpointError(f"proj_out has {out} rows, not a multiple of the {tuple(patch)} patch")
    image = "condition_embedder.image_embedder.norm1.weight" in shapes
    pos = shapes.get("condition_embedder.image_embedder.pos_embed")
    return dict(patch_size=tuple(patch), num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM,
                in_channels=in_channels, out_channels=out // patch_numel,
                text_dim=_shape(shapes, "condition_embedder.text_embedder.linear_1.weight", 2)[1],
                freq_dim=_shape(shapes, "condition_embedder.time_embedder.linear_1.weight", 2)[1],
                ffn_dim=_shape(shapes, "blocks.0.ffn.net.0.proj.weight", 2)[0],
                num_layers=num_blocks(shapes, "blocks."),
                cross_attn_norm="blocks.0.norm2.weight" in shapes,
                qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in shapes else None,
                eps=1e-6,
                image_dim=_shape(shapes, "condition_embedder.image_embedder.norm1.weight", 1)[0] if image else None,
                added_kv_proj_dim=dim if image else None, rope_max_seq_len=1024,
                pos_embed_seq_len=None if pos is None else pos.shape[1])


def wan_variant(config: dict) -> str:
    key = (config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"],
           config["out_channels"], config["image_dim"] is not None)
    return VARIANTS.get(key, "wan")


def _renaming(keys) -> dict:
    """original key -> diffusers key, by diffusers' converter run on placeholders (it only renames)."""
    tokens = {k: torch.empty(0, device="meta") for k in keys}
    ids = {id(t): k for k, t in tokens.items()}
    return {ids[id(t)]: new for new, t in convert_wan_transformer_to_diffusers(dict(tokens)).items()}


def original_from_diffusers(sd: dict) -> dict:
    """diffusers keys -> original Wan keys: the exact inverse of the converter's renaming, built from it."""
    forward = _renaming(_original_keys(sd))
    back = {d: o for o, d in forward.items()}
    missing = [k for k in sd if k not in back]
    if missing:
        raise CheckpointError(f"{len(missing)} diffusers keys have no original Wan name, e.g. {missing[:5]}")
    return {back[k]: v for k, v in sd.items()}


def _original_keys(sd: dict) -> list:
    """The original names of a diffusers Wan state dict, by the converter's table read backwards (for the
    inverse above; checked against the converter itself there)."""
    pairs = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"),
             ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
             ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
             ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
             ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
             ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
             ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."),
             (".to_k.", ".k."), (".to_v.", ".v."), (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."),
             (".norm_added_k.", ".norm_k_img."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
             ("proj_out", "head.head")]
    out = []
    for k in sd:
        o = k
        if o == "scale_shift_table":
            o = "head.modulation"
        elif o.endswith(".scale_shift_table"):
            o = o[:-len("scale_shift_table")] + "modulation"
        for d, orig in pairs:
            o = o.replace(d, orig)
        o = re.sub(r"\.norm2\.", ".norm3.", o) if ".norm2." in o else re.sub(r"\.norm3\.", ".norm2.", o)
        out.append(o)
    return out


def read_wan_info(path) -> WanCheckpointInfo:
    """Layout, config, variant and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, WAN_EXPECTED)
    keys, prefix = diffusion_model_keys(header)
    keys, scales = scaled_fp8_keys(keys)
    shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
    layout = detect_wan_layout(shapes)
    if layout is None:
        if not shapes:
            raise CheckpointError(f"contains no tensors; expected {WAN_EXPECTED}")
        raise CheckpointError("does not look like a Wan transformer: no 'patch_embedding.weight' with "
                              "'blocks.N.self_attn.*' / 'blocks.N.attn1.*' keys (found keys like "
                              f"{key_sample(shapes)}); {guess_content(shapes)}")
    names = _renaming(shapes) if layout == "wan" else {k: k for k in shapes}  # file key -> diffusers key
    diff_shapes = {names[k]: v for k, v in shapes.items()}
    config = wan_config_from_shapes(diff_shapes)
    info = WanCheckpointInfo(path=path, layout=layout, config=config, variant=wan_variant(config),
                             stored_dtypes=stored_dtypes(header, keys), scaled_fp8=bool(scales))
    return info, prefix, names, diff_shapes, scales


def load_wan_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None, progress=None):
    """Load a Wan transformer file; returns (WanTransformer3DModel in eval mode, WanCheckpointInfo).

    fp8: the blocks' Linear weights kept in float8_e4m3fn (models/fp8.py; a scaled-fp8 file's weights are
    dequantised first, then plain-cast, as any other file's). stage: (start, stop), a PipeFusion block range;
    only its tensors are read. progress(bytes read, bytes to read) after each tensor."""
    from diffusers import WanTransformer3DModel

    path = os.fspath(path)
    try:
        info, prefix, names, diff_shapes, scales = _inspect(path)
        model = checked_meta_model(WanTransformer3DModel, info.config, diff_shapes, "Wan")
        WAN_BLOCKS.make_resident(model, stage, fp8)
        want = resident_dtypes(model, dtype)
        file_key = {d: prefix + f for f, d in names.items()}
        reads = {file_key[k]: t for k, t in want.items()}
        sd = read_tensors(path, list(reads), dtype=reads, device=device, progress=progress, expected=WAN_EXPECTED,
                          scales={prefix + k: prefix + s for k, s in
                                  ((k[len(prefix):], s[len(prefix):]) for k, s in scales.items())})
        back = {v: k for k, v in file_key.items()}
        sd = {back[k]: v for k, v in sd.items()}
    except CheckpointError as e:
        raise with_path(path, e) from e
    real_rope(model, device)
    return assign_state_dict(model, sd, path), info


def real_rope(model, device):
    """The RoPE tables are computed buffers, not weights: a model built on the meta device gets real ones."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    c = model.config
    model.rope = WanRotaryPosEmbed(c.attention_head_dim, c.patch_size, c.rope_max_seq_len).to(device)
    return model


def write_wan_checkpoint(model, path, layout: str = "wan", dtype=None, scaled_fp8: bool = False):
    """Save ``model`` as one file: 'wan' (original keys, as ComfyUI's repackaged files), 'comfy' (those under
    model.diffusion_model.) or 'diffusers'. scaled_fp8: as ComfyUI's scaled-fp8 files (scaled_fp8_state_dict)."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if scaled_fp8:
        out = scaled_fp8_state_dict(model, dtype)
        marker = {SCALED_FP8: out.pop(SCALED_FP8)}
    else:
        out, marker = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}, {}
    if layout != "diffusers":
        renamed = original_from_diffusers({k: v for k, v in out.items() if not k.endswith(".scale_weight")})
        scale_names = original_from_diffusers({k[:-len("scale_weight")] + "weight": v for k, v in out.items()
                                               if k.endswith(".scale_weight")})
        renamed.update({k[:-len("weight")] + "scale_weight": v for k, v in scale_names.items()})
        out = renamed
    out.update(marker)
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    save_file({prefix + k: v.contiguous().clone() for k, v in out.items()}, os.fspath(path))
    return path
