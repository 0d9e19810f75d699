"""Load PixArt-α / PixArt-Σ transformer single-file checkpoints into diffusers' PixArtTransformer2DModel.

Accepted layouts: the original PixArt keys (``blocks.N.attn.qkv.weight``, ``blocks.N.cross_attn.kv_linear``,
``t_block.1``, ``y_embedder.y_proj.fc1``, ``final_layer.linear``), as the released files and ComfyUI's own model
hold them, also under ComfyUI's ``model.diffusion_model.`` prefix; and diffusers keys
(``transformer_blocks.N.attn1.to_q.weight``, ``adaln_single.linear``, ``caption_projection.linear_1``). Storage
bf16 / fp16 / fp32 / fp8_e4m3fn, and ComfyUI's scaled fp8 (a ``scaled_fp8`` marker and per-Linear
``scale_weight``), dequantised on the way in. diffusers has no single-file converter for PixArt, so the
renaming is this module's table (``_rules``): a pure renaming, except that the original fused self-attention
``qkv`` and cross-attention ``kv_linear`` are split by rows, in that order, into to_q / to_k / to_v.

The config comes from tensor shapes as ComfyUI's detection reads them: micro-conditions (PixArt-α 1024-MS's
size and aspect-ratio embedders) iff ``ar_embedder`` is there; an original file's fixed sin-cos ``pos_embed``
table gives the model's sample size and ComfyUI's position interpolation (its side in latent pixels // 64); a
file without one (diffusers' layout) gets ComfyUI's interpolation from each latent's size. The head count is
width // 72 (every PixArt; ComfyUI assumes 16 heads of 72). The table runs on meta tensors first, so a bad
file fails before anything is read, and a PipeFusion stage reads only its own tensors.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from ..blocks import BlockLayout
from ..checkpoint import (COMFY_PREFIX, CheckpointError, assign_state_dict, checked_meta_model, diffusion_model_keys,
                          guess_content, key_sample, meta_shapes, num_blocks, read_header, read_tensors,
                          resident_dtypes, scaled_fp8_keys, scaled_fp8_renamed, scaled_fp8_state_dict, stored_dtypes,
                          with_path)

# The time embedder (adaln_single) and the caption projection stay on every PipeFusion stage: each block takes
# the timestep's modulation and cross-attends to the projected text. The patch embedder runs on the first stage.
PIXART_BLOCKS = BlockLayout(containers=("transformer_blocks",), embedders=("pos_embed",),
                            head=("norm_out", "proj_out"))
PIXART_EXPECTED = "a PixArt-α / PixArt-Σ transformer checkpoint"
HEAD_DIM = 72          # every PixArt release; ComfyUI builds 16 heads of 1152
PE_LATENT = 64         # ComfyUI: the latent side (512 px) whose position interpolation is 1
LAYOUTS = ("pixart", "comfy", "diffusers")
# (width, blocks, micro-conditions, sample size) of the releases; others are "pixart-alpha" / "pixart-sigma"
VARIANTS = {(1152, 28, True, 128): "pixart-alpha-xl-2-1024", (1152, 28, False, 128): "pixart-sigma-xl-2-1024",
            (1152, 28, False, 256): "pixart-sigma-xl-2-2048", (1152, 28, False, 64): "pixart-sigma-xl-2-512"}

# original module -> diffusers module (weight and bias alike), outside the blocks
_TOP = {"x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
        "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
        "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
        "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "final_layer.linear": "proj_out"}
# inside block N (blocks.N. -> transformer_blocks.N.): one-to-one modules, and fused ones split by rows in order
_BLOCK = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0",
          "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_FUSED = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v")}
# tensors a file may hold that the forward never uses (ComfyUI ignores them too): the original null-caption
# embedding of training's caption dropout and the fixed sin-cos table (read for the config only); in diffusers'
# layout the same two under its names
IGNORED = {"pixart": ("y_embedder.y_embedding", "pos_embed"),
           "diffusers": ("caption_projection.y_embedding", "pos_embed.pos_embed")}
# original keys of PixArt variants that neither ComfyUI's nor diffusers' PixArt runs
_UNSUPPORTED = ((re.compile(r"blocks\.\d+\.attn\.(sr|norm)\."), "KV token compression (PixArt-Σ's KV-compress "
                 "attention)"),
                (re.compile(r"blocks\.\d+\.attn\.(q_norm|k_norm)\."), "q/k norms"))


@dataclass
class PixArtCheckpointInfo:
    path: str
    layout: str              # "pixart" (original keys, with or without ComfyUI's prefix) or "diffusers"
    config: dict             # PixArtTransformer2DModel kwargs
    stored_dtypes: set = field(default_factory=set)
    variant: str = "pixart-sigma"
    scaled_fp8: bool = False  # ComfyUI's scaled fp8: weights were dequantised (stored * scale_weight)


def detect_pixart_layout(keys) -> str | None:
    """'pixart' or 'diffusers' for a PixArt transformer's (prefix-stripped) keys, None for anything else. The
    original layout is ComfyUI's own test (t_block); diffusers' needs the patch embedder too, which LTX-Video's
    (also adaln_single) lacks."""
    keys = set(keys)
    if "t_block.1.weight" in keys and any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in keys):
        return "pixart"
    if ("adaln_single.linear.weight" in keys and "pos_embed.proj.weight" in keys
            and any(re.match(r"transformer_blocks\.\d+\.attn2\.to_k\.weight$", k) for k in keys)):
        return "diffusers"
    return None


def _rules(num_layers: int) -> list[tuple[str, list[str], str]]:
    """(original key, [diffusers keys], op) for every tensor of a PixArt of num_layers blocks (with the
    micro-condition embedders; a model without them simply has no such keys): op 'copy' or 'split' (the rows of a
    fused tensor, in equal parts in the targets' order). The LoRA targets are this table too."""
    out = [("final_layer.scale_shift_table", ["scale_shift_table"], "copy")]
    for o, d in _TOP.items():
        out += [(f"{o}.{p}", [f"{d}.{p}"], "copy") for p in ("weight", "bias")]
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out.append((src + "scale_shift_table", [dst + "scale_shift_table"], "copy"))
        for o, d in _BLOCK.items():
            out += [(f"{src}{o}.{p}", [f"{dst}{d}.{p}"], "copy") for p in ("weight", "bias")]
        for o, ds in _FUSED.items():
            out += [(f"{src}{o}.{p}", [f"{dst}{d}.{p}" for d in ds], "split") for p in ("weight", "bias")]
    return out


def _unsupported(keys) -> None:
    for pattern, what in _UNSUPPORTED:
        found = sorted(k for k in keys if pattern.match(k))
        if found:
            raise CheckpointError(f"this PixArt uses {what} (keys like {found[0]!r}), which neither ComfyUI's nor "
                                  "diffusers' PixArt runs; PixArt-α and the PixArt-Σ base models are supported")


def _renaming(shapes: dict) -> dict:
    """diffusers key -> (original key, first row, end row) for an original-layout file's tensors (shapes: key ->
    anything with .shape, e.g. meta tensors); the ignored tensors dropped, anything unknown refused."""
    _unsupported(shapes)
    rules = {o: (ds, op) for o, ds, op in _rules(num_blocks(shapes, "blocks."))}
    unknown = sorted(k for k in shapes if k not in rules and k not in IGNORED["pixart"])
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys for a PixArt transformer, e.g. {unknown[:5]}")
    out = {}
    for k, v in shapes.items():
        if k not in rules:
            continue
        ds, op = rules[k]
        rows = v.shape[0] if op == "split" else 0
        if op == "split" and (v.dim() not in (1, 2) or rows % len(ds)):
            raise CheckpointError(f"'{k}' has shape {tuple(v.shape)}; expected rows in {len(ds)} equal parts")
        part = rows // len(ds) if op == "split" else None
        for j, d in enumerate(ds):
            out[d] = (k, None, None) if part is None else (k, j * part, (j + 1) * part)
    return out


def diffusers_from_original(sd: dict) -> dict:
    """Original PixArt keys -> diffusers keys (fused tensors split by rows, as views); the unused tensors dropped.
    Works on real or meta tensors; refuses unknown keys and variants diffusers cannot run."""
    return {d: sd[o] if a is None else sd[o][a:b] for d, (o, a, b) in _renaming(sd).items()}


def original_from_diffusers(sd: dict) -> dict:
    """diffusers keys -> original PixArt keys (to_q / to_k / to_v fused back in row order): the exact inverse of
    diffusers_from_original on the tensors a model holds."""
    rules = _rules(num_blocks(sd, "transformer_blocks."))
    taken = {d for _, ds, _ in rules for d in ds}
    left = sorted(k for k in sd if k not in taken and k not in IGNORED["diffusers"])
    if left:
        raise CheckpointError(f"{len(left)} diffusers keys have no original PixArt name, e.g. {left[:5]}")
    out = {}
    for o, ds, op in rules:
        present = [d in sd for d in ds]
        if not any(present):
            continue
        if not all(present):
            raise CheckpointError(f"'{o}' needs all of {ds}; the state dict has only some")
        out[o] = sd[ds[0]] if op == "copy" else torch.cat([sd[d] for d in ds], dim=0)
    return out


def _shape(shapes: dict, key: str, ndim: int) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"key '{key}' missing; needed to infer the PixArt model size")
    shape = tuple(shapes[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"'{key}' has shape {shape}; expected a {ndim}-d tensor for a PixArt transformer")
    return shape


def position_table(tokens: int | None, patch: int) -> tuple[int, int | None]:
    """(sample_size, interpolation_scale) from an original file's pos_embed token count, as ComfyUI's detection
    reads them: input size = isqrt(tokens) * patch latent pixels, interpolation = input size // 64. Without a
    table (None): sample size 128 (diffusers' default; nothing reads it) and no fixed interpolation, so each
    latent gets ComfyUI's own from its size. An interpolation of 0 (a table under 64 latent pixels, where
    ComfyUI's positions would divide by zero) also means the latent's own."""
    if tokens is None:
        return 128, None
    size = math.isqrt(tokens) * patch
    return size, (size // PE_LATENT) or None


def pixart_config_from_shapes(shapes: dict, pos_tokens: int | None = None) -> dict:
    """PixArtTransformer2DModel kwargs from diffusers-named tensor shapes (meta tensors do); pos_tokens: the token
    count of an original file's pos_embed table, if it has one."""
    width, in_channels, patch, patch_w = _shape(shapes, "pos_embed.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"the patch embedder's kernel is {patch}x{patch_w}; PixArt's patches are square")
    if width % HEAD_DIM:
        raise CheckpointError(f"width {width} is not a multiple of PixArt's attention head size {HEAD_DIM}")
    out = _shape(shapes, "proj_out.weight", 2)[0]
    if out % (patch * patch):
        raise CheckpointError(f"proj_out has {out} rows, not a multiple of the {patch}x{patch} patch")
    caption, text = _shape(shapes, "caption_projection.linear_2.weight", 2)[0], _shape(
        shapes, "caption_projection.linear_1.weight", 2)[1]
    cross = _shape(shapes, "transformer_blocks.0.attn2.to_k.weight", 2)[1]
    if caption != width or cross != width:
        raise CheckpointError(f"the caption projection gives {caption} and cross-attention takes {cross} values "
                              f"per text token; a PixArt of width {width} needs both {width}")
    sample_size, interpolation = position_table(pos_tokens, patch)
    return dict(attention_head_dim=HEAD_DIM, in_channels=in_channels, out_channels=out // (patch * patch),
                patch_size=patch, sample_size=sample_size, num_attention_heads=width // HEAD_DIM,
                num_layers=num_blocks(shapes, "transformer_blocks."), cross_attention_dim=width,
                caption_channels=text, interpolation_scale=interpolation,
                use_additional_conditions="adaln_single.emb.aspect_ratio_embedder.linear_1.weight" in shapes)


def pixart_variant(config: dict) -> str:
    key = (config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"],
           bool(config["use_additional_conditions"]), config["sample_size"])
    if config.get("interpolation_scale") is None:  # no position table: the release's size is unknown
        return "pixart-alpha" if key[2] else "pixart-sigma"
    return VARIANTS.get(key, "pixart-alpha" if key[2] else "pixart-sigma")


def read_pixart_info(path) -> PixArtCheckpointInfo:
    """Layout, config, variant and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, PIXART_EXPECTED)
    keys, prefix = diffusion_model_keys(header)
    keys, scales = scaled_fp8_keys(keys)
    shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
    layout = detect_pixart_layout(shapes)
    if layout is None:
        if not shapes:
            raise CheckpointError(f"contains no tensors; expected {PIXART_EXPECTED}")
        raise CheckpointError("does not look like a PixArt transformer: no 't_block.1.weight' with "
                              "'blocks.N.attn.qkv.*' keys, nor 'adaln_single.*' with 'pos_embed.proj.*' and "
                              f"'transformer_blocks.N.attn2.*' (found keys like {key_sample(shapes)}); "
                              f"{guess_content(shapes)}")
    pos_tokens = None
    if layout == "pixart":
        names = _renaming(shapes)  # diffusers key -> (file key, rows)
        if "pos_embed" in shapes:
            table = shapes["pos_embed"].shape
            if len(table) != 3:
                raise CheckpointError(f"'pos_embed' has shape {tuple(table)}; expected [1, tokens, width]")
            pos_tokens = table[1]
    else:
        names = {k: (k, None, None) for k in shapes if k not in IGNORED["diffusers"]}
    diff_shapes = {d: shapes[o] if a is None else shapes[o][a:b] for d, (o, a, b) in names.items()}
    config = pixart_config_from_shapes(diff_shapes, pos_tokens)
    info = PixArtCheckpointInfo(path=path, layout=layout, config=config, variant=pixart_variant(config),
                                stored_dtypes=stored_dtypes(header, keys), scaled_fp8=bool(scales))
    return info, prefix, names, diff_shapes, scales


def load_pixart_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None,
                            progress=None):
    """Load a PixArt transformer file; returns (PixArtTransformer2DModel in eval mode, PixArtCheckpointInfo).

    fp8: the blocks' Linear weights kept in float8_e4m3fn (models/fp8.py; a scaled-fp8 file's weights are
    dequantised first, then plain-cast, as any other file's). stage: (start, stop), a PipeFusion block range;
    only its tensors are read. progress(bytes read, bytes to read) after each tensor."""
    from diffusers import PixArtTransformer2DModel

    path = os.fspath(path)
    try:
        info, prefix, names, diff_shapes, scales = _inspect(path)
        model = checked_meta_model(PixArtTransformer2DModel, info.config, diff_shapes, "PixArt")
        PIXART_BLOCKS.make_resident(model, stage, fp8)
        # a fused file tensor is read once, in its parts' dtype (all fp8 or none)
        want = resident_dtypes(model, dtype)
        reads = {prefix + names[k][0]: t for k, t in want.items()}
        sd = read_tensors(path, list(reads), dtype=reads, device=device, progress=progress,
                          expected=PIXART_EXPECTED, scales=scales)
        sd = {k: _rows(sd[prefix + names[k][0]], *names[k][1:]) for k in want}
    except CheckpointError as e:
        raise with_path(path, e) from e
    real_pos_embed(model, device)
    return assign_state_dict(model, sd, path), info


def _rows(t: torch.Tensor, start, stop) -> torch.Tensor:
    """A fused tensor's part: a row range, contiguous as a view (the parts share the one read, no copy)."""
    return t if start is None else t[start:stop]


def real_pos_embed(model, device):
    """diffusers' own sin-cos table (a computed, unsaved buffer; the family's forward builds ComfyUI's positions
    instead): a model built on the meta device gets a real one, as diffusers computes it."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    embed = model.pos_embed
    if embed is None:  # a PipeFusion stage without the embedders
        return model
    c = model.config
    grid = c.sample_size // c.patch_size
    table = get_2d_sincos_pos_embed(embed.proj.out_channels, grid, base_size=embed.base_size,
                                    interpolation_scale=embed.interpolation_scale, output_type="pt")
    embed.register_buffer("pos_embed", table.float().unsqueeze(0).to(device), persistent=False)
    return model


def write_pixart_checkpoint(model, path, layout: str = "pixart", dtype=None, scaled_fp8: bool = False,
                            extras: bool = True):
    """Save ``model`` as one file: 'pixart' (original keys, as the released files), 'comfy' (those under
    model.diffusion_model.) or 'diffusers'. scaled_fp8: as ComfyUI's scaled-fp8 files (scaled_fp8_state_dict;
    a fused qkv gets one scale). extras: in the original layouts, the tensors the released files carry beside the
    weights: the null-caption y_embedding and, for a model with a fixed position interpolation, the pos_embed
    table that ComfyUI reads it from."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        out = scaled_fp8_state_dict(model, dtype) if scaled_fp8 else {k: v.to(dtype or v.dtype) for k, v in sd.items()}
    else:
        out = original_from_diffusers(sd)
        if scaled_fp8:
            out = _scaled_fp8_original(model, out, dtype)
        else:
            out = {k: v.to(dtype or v.dtype) for k, v in out.items()}
        if extras:
            c = model.config
            out["y_embedder.y_embedding"] = torch.zeros(120, c.caption_channels, dtype=dtype or torch.float32)
            if c.interpolation_scale is not None:
                side = c.sample_size // c.patch_size
                out["pos_embed"] = torch.zeros(1, side * side, c.num_attention_heads * c.attention_head_dim,
                                               dtype=dtype or torch.float32)
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    save_file({prefix + k: v.contiguous().clone() for k, v in out.items()}, os.fspath(path))
    return path


def _scaled_fp8_original(model, original: dict, dtype) -> dict:
    """ComfyUI's scaled fp8 of an original-layout state dict (models/checkpoint.scaled_fp8_renamed): a fused
    qkv / kv_linear weight is one Linear there, scaled whole."""
    return scaled_fp8_renamed(model, original, {d: o for o, ds, _ in _rules(model.config.num_layers) for d in ds},
                              dtype)