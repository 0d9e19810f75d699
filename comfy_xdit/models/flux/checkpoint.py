"""Load Flux.1 transformer single-file checkpoints into diffusers' FluxTransformer2DModel.

Accepted layouts: BFL originals (``double_blocks.*``), the same keys under ComfyUI's
``model.diffusion_model.`` prefix (other components in an all-in-one file are ignored),
and diffusers keys (``transformer_blocks.*``). The model config is derived from tensor
shapes only, so reduced or non-standard widths load as well as FLUX.1-dev/schnell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from ..checkpoint import (COMFY_PREFIX, CheckpointError, assign_state_dict, diffusion_model_keys, guess_content,  # noqa: F401
                         key_sample, meta_shapes, num_blocks, read_header, read_tensors,
                         scaled_fp8_keys, stored_dtypes, with_path)
from ..blocks import BlockLayout
from ..fp8 import FP8

PREFIX = COMFY_PREFIX
_LIN = ("weight", "bias")
FLUX_EXPECTED = "a Flux.1 transformer checkpoint"


@dataclass
class FluxCheckpointInfo:
    path: str
    layout: str
    variant: str
    config: dict
    stored_dtypes: set = field(default_factory=set)


def _strip(k: str) -> str:
    return k[len(PREFIX):] if k.startswith(PREFIX) else k


def detect_layout_or_none(keys) -> str | None:
    """'bfl' or 'diffusers' for a Flux.1 transformer's (prefix-stripped) keys, else None (for the registry)."""
    ks = [_strip(k) for k in keys]
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks):
        return "bfl"
    if "x_embedder.weight" in ks and any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in ks):
        return "diffusers"
    return None


def detect_layout(keys) -> str:
    """'bfl' for BFL/ComfyUI keys (prefix optional), 'diffusers' for diffusers keys, else CheckpointError."""
    ks = [_strip(k) for k in keys]
    if not ks:
        raise CheckpointError("contains no tensors; expected a Flux.1 transformer checkpoint")
    layout = detect_layout_or_none(ks)
    if layout is None:
        raise CheckpointError("does not look like a Flux.1 transformer: no 'double_blocks.*' or "
                              f"'transformer_blocks.*' keys (found keys like {key_sample(ks)}); {guess_content(ks)}")
    return layout


def rope_axes_for_head_dim(head_dim: int) -> tuple:
    """Rope axes (t, h, w) for a head size. Rope has no weights, so this is a convention:
    (16, 56, 56) for 128 (FLUX.1); otherwise a = round(head_dim*56/128/2)*2 and (head_dim-2a, a, a),
    which keeps FLUX.1's proportions, sums to head_dim and keeps every axis even."""
    if head_dim == 128:
        return (16, 56, 56)
    a = round(head_dim * 56 / 128 / 2) * 2
    if head_dim % 2 or a < 2 or head_dim - 2 * a < 2:
        raise CheckpointError(f"attention head size {head_dim} gives no usable rope split "
                              f"({head_dim - 2 * a}, {a}, {a}); every axis must be even and >= 2")
    return (head_dim - 2 * a, a, a)


_SHAPE_KEYS = {  # where each size can be read off, per layout
    "bfl": dict(x="img_in.weight", ctx="txt_in.weight", vec="vector_in.in_layer.weight",
                out="final_layer.linear.weight", dbl="double_blocks.", sgl="single_blocks.",
                qn=("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.0.norm.query_norm.scale"),
                guid="guidance_in.in_layer.weight"),
    "diffusers": dict(x="x_embedder.weight", ctx="context_embedder.weight",
                      vec="time_text_embed.text_embedder.linear_1.weight", out="proj_out.weight",
                      dbl="transformer_blocks.", sgl="single_transformer_blocks.",
                      qn=("transformer_blocks.0.attn.norm_q.weight", "single_transformer_blocks.0.attn.norm_q.weight"),
                      guid="time_text_embed.guidance_embedder.linear_1.weight"),
}


def flux_config_from_state_dict(sd, layout) -> dict:
    """FluxTransformer2DModel kwargs from tensor shapes only (works on meta tensors).

    Width from img_in/x_embedder rows, head size from the q-norm scale, block counts from the
    highest block index; guidance_embeds is True when a guidance embedder is present (dev)."""
    sd = {_strip(k): v for k, v in sd.items()}
    names = _SHAPE_KEYS[layout]
    missing = [names[n] for n in ("x", "ctx", "vec", "out") if names[n] not in sd]
    qn = next((k for k in names["qn"] if k in sd), None)
    if missing or qn is None:
        raise CheckpointError(f"missing keys needed to infer the model size: {missing or list(names['qn'])}")
    inner, in_channels = sd[names["x"]].shape
    head_dim = sd[qn].shape[0]
    if inner % head_dim:
        raise CheckpointError(f"width {inner} is not a multiple of the attention head size {head_dim}")
    keys = list(sd)
    return dict(patch_size=1, in_channels=int(in_channels), out_channels=int(sd[names["out"]].shape[0]),
                num_layers=num_blocks(keys, names["dbl"]), num_single_layers=num_blocks(keys, names["sgl"]),
                attention_head_dim=int(head_dim), num_attention_heads=int(inner // head_dim),
                joint_attention_dim=int(sd[names["ctx"]].shape[1]), pooled_projection_dim=int(sd[names["vec"]].shape[1]),
                guidance_embeds=names["guid"] in sd, axes_dims_rope=rope_axes_for_head_dim(int(head_dim)))


def flux_variant(config) -> str:
    """'dev' (guidance-distilled, has a guidance embedder) or 'schnell' (no guidance input)."""
    return "dev" if config["guidance_embeds"] else "schnell"


def _rules(num_layers, num_single, guidance):
    """(bfl key, [diffusers keys], op) for every tensor; op is 'copy', 'split' (fused rows) or 'swap'."""
    def lin(b, d, op="copy"):  # one rule per weight/bias of a Linear
        return [(f"{b}.{s}", [f"{x}.{s}" for x in (d if isinstance(d, list) else [d])], op) for s in _LIN]

    emb = [("img_in", "x_embedder"), ("txt_in", "context_embedder"),
           ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
           ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
           ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
           ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out")]
    if guidance:
        emb += [("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
    r = [x for b, d in emb for x in lin(b, d)]
    r += lin("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")  # BFL shift,scale vs diffusers scale,shift
    for i in range(num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for s, t in (("img", ""), ("txt", "_context")):
            r += lin(f"{b}{s}_mod.lin", f"{d}norm1{t}.linear")
            r += lin(f"{b}{s}_mlp.0", f"{d}ff{t}.net.0.proj") + lin(f"{b}{s}_mlp.2", f"{d}ff{t}.net.2")
        r += lin(f"{b}img_attn.qkv", [f"{d}attn.to_{x}" for x in "qkv"], "split")
        r += lin(f"{b}txt_attn.qkv", [f"{d}attn.add_{x}_proj" for x in "qkv"], "split")
        r += lin(f"{b}img_attn.proj", f"{d}attn.to_out.0") + lin(f"{b}txt_attn.proj", f"{d}attn.to_add_out")
        for s, t in (("img", ""), ("txt", "added_")):
            r += [(f"{b}{s}_attn.norm.query_norm.scale", [f"{d}attn.norm_{t}q.weight"], "copy"),
                  (f"{b}{s}_attn.norm.key_norm.scale", [f"{d}attn.norm_{t}k.weight"], "copy")]
    for i in range(num_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        r += lin(f"{b}linear1", [f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v", f"{d}proj_mlp"], "split")
        r += lin(f"{b}linear2", f"{d}proj_out") + lin(f"{b}modulation.lin", f"{d}norm.linear")
        r += [(f"{b}norm.query_norm.scale", [f"{d}attn.norm_q.weight"], "copy"),
              (f"{b}norm.key_norm.scale", [f"{d}attn.norm_k.weight"], "copy")]
    return r


def _swap(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _check_leftover(sd, used):
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{len(left)} unexpected keys for a Flux.1 transformer, e.g. {left[:5]}")


def bfl_to_diffusers(sd, config) -> dict:
    """Map BFL/ComfyUI keys to diffusers keys; fused qkv/linear1 rows are split by the config's width."""
    sd = {_strip(k): v for k, v in sd.items()}
    rules = _rules(config["num_layers"], config["num_single_layers"], config["guidance_embeds"])
    missing = [b for b, _, _ in rules if b not in sd]
    if missing:
        raise CheckpointError(f"{len(missing)} keys missing for a Flux.1 transformer "
                              f"({config['num_layers']}+{config['num_single_layers']} blocks), e.g. {missing[:5]}")
    _check_leftover(sd, {b for b, _, _ in rules})
    return _apply_rules(sd, rules, config)


def _apply_rules(sd, rules, config) -> dict:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}
    for b, ds, op in rules:
        t = sd[b]
        if op == "swap":
            t = [_swap(t)]
        elif op == "split":
            sizes = [inner] * 3 + ([t.shape[0] - 3 * inner] if len(ds) == 4 else [])
            if sum(sizes) != t.shape[0] or min(sizes) <= 0:
                raise CheckpointError(f"'{b}' has {t.shape[0]} rows, cannot split into {sizes} (width {inner})")
            t = torch.split(t, sizes, dim=0)
        else:
            t = [t]
        out.update(zip(ds, t))
    return out


def diffusers_to_bfl(sd) -> dict:
    """Exact inverse of bfl_to_diffusers: diffusers keys -> BFL keys (no prefix)."""
    keys = list(sd)
    rules = _rules(num_blocks(keys, "transformer_blocks."), num_blocks(keys, "single_transformer_blocks."),
                   "time_text_embed.guidance_embedder.linear_1.weight" in sd)
    missing = [d for _, ds, _ in rules for d in ds if d not in sd]
    if missing:
        raise CheckpointError(f"{len(missing)} diffusers keys missing, e.g. {missing[:5]}")
    _check_leftover(sd, {d for _, ds, _ in rules for d in ds})
    out = {}
    for b, ds, op in rules:
        out[b] = _swap(sd[ds[0]]) if op == "swap" else torch.cat([sd[d] for d in ds], dim=0) if op == "split" else sd[ds[0]]
    return out


def _check_fits(expected, sd):
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{len(missing)} keys missing for a Flux.1 transformer, e.g. {missing[:5]}")
    _check_leftover(sd, set(expected))
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"tensor shapes do not fit the inferred Flux config, e.g. {bad[:3]}")


FLUX_BLOCKS = BlockLayout(containers=("transformer_blocks", "single_transformer_blocks"),
                          embedders=("x_embedder", "context_embedder"), head=("norm_out", "proj_out"))
keep_stage = FLUX_BLOCKS.keep_stage
store_blocks_fp8 = FLUX_BLOCKS.store_fp8


def read_flux_info(path) -> FluxCheckpointInfo:
    """Layout, variant, config and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, FLUX_EXPECTED)
    keys, _ = diffusion_model_keys(header)  # a ComfyUI file: only the diffusion model
    keys, _scales = scaled_fp8_keys(keys)  # ComfyUI's scaled fp8: the scales travel beside their weights
    layout = detect_layout(keys)
    shapes = {_strip(k): v for k, v in meta_shapes(header, keys).items()}
    config = flux_config_from_state_dict(shapes, layout)
    info = FluxCheckpointInfo(path=path, layout=layout, variant=flux_variant(config), config=config,
                              stored_dtypes=stored_dtypes(header, keys))
    return info, keys, shapes


def load_flux_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None, progress=None):
    """Load a Flux.1 transformer file; returns (FluxTransformer2DModel in eval mode, FluxCheckpointInfo).

    fp8: the blocks' Linear weights are kept in float8_e4m3fn (as stored in an fp8 file, plain-cast from
    any other) and upcast to ``dtype`` per layer (models/fp8.py); everything else is ``dtype``.
    stage: (start, stop), a block range in block order (double then single); only those blocks, plus the
    embedders if start == 0 and the head if stop is the last block, are read (see keep_stage).
    progress(bytes read, bytes to read), if given, after each tensor read."""
    from diffusers import FluxTransformer2DModel

    path = os.fspath(path)
    try:
        info, keys, shapes = _inspect(path)
        config, layout = info.config, info.layout
        with torch.device("meta"):  # no weight allocation; real tensors are assigned below
            model = FluxTransformer2DModel(**config)
        # Validate the whole file on header shapes first, so a bad file fails before gigabytes are read.
        _check_fits(model.state_dict(), bfl_to_diffusers(shapes, config) if layout == "bfl" else shapes)
        if stage is not None:
            keep_stage(model, *stage)
        if fp8:
            store_blocks_fp8(model)
        # the resident tensors, each in the dtype it is kept in; fp8 ones are read as stored or cast once
        want = {k: FP8 if v.dtype == FP8 else dtype for k, v in model.state_dict().items()}
        rules = (_rules(config["num_layers"], config["num_single_layers"], config["guidance_embeds"])
                 if layout == "bfl" else [(k, [k], "copy") for k in want])
        rules = [r for r in rules if r[1][0] in want]
        file_key = {_strip(k): k for k in keys}
        scales = scaled_fp8_keys(diffusion_model_keys(read_header(path, FLUX_EXPECTED))[0])[1]
        sd = read_tensors(path, [file_key[b] for b, _, _ in rules], device=device, expected=FLUX_EXPECTED,
                          dtype={file_key[b]: want[ds[0]] for b, ds, _ in rules}, progress=progress, scales=scales)
        sd = _apply_rules({_strip(k): v for k, v in sd.items()}, rules, config)
    except CheckpointError as e:
        raise with_path(path, e) from e
    return assign_state_dict(model, sd, path), info


def write_flux_checkpoint(model, path, layout="bfl", dtype=None):
    """Save ``model`` as a single-file checkpoint: 'bfl', 'comfy' (BFL under model.diffusion_model.) or 'diffusers'."""
    from safetensors.torch import save_file

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout in ("bfl", "comfy"):
        sd = diffusers_to_bfl(sd)
    elif layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}")
    prefix = PREFIX if layout == "comfy" else ""
    # clone: save_file rejects tensors that share storage
    sd = {prefix + k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}
    save_file(sd, os.fspath(path))
    return path
