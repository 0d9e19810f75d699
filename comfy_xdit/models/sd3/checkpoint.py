"""Load SD3 / SD3.5 transformer single-file checkpoints into diffusers' SD3Transformer2DModel.

Accepted layouts: SAI originals (``joint_blocks.*``, as sd3_medium / sd3.5_medium / sd3.5_large ship), the
same keys under ComfyUI's ``model.diffusion_model.`` prefix (text encoders and VAE beside it in an all-in-one
file are ignored), and diffusers keys (``transformer_blocks.*`` with ``pos_embed.proj``). The config comes
from tensor shapes only; SAI -> diffusers is diffusers' own converter, run first on meta tensors to validate
the file before anything is read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers, swap_scale_shift

from ..blocks import BlockLayout
from ..checkpoint import (COMFY_PREFIX, CheckpointError, assign_state_dict, diffusion_model_keys, guess_content,
                          key_sample, meta_shapes, num_blocks, read_header, read_tensors, scaled_fp8_keys,
                          stored_dtypes, with_path)
from ..fp8 import FP8

SD3_BLOCKS = BlockLayout(containers=("transformer_blocks",), embedders=("pos_embed", "context_embedder"),
                         head=("norm_out", "proj_out"))
SD3_EXPECTED = "an SD3 / SD3.5 transformer checkpoint"
HEAD_DIM = 64  # the SD3 family's attention head size when no q/k norm weight tells it (ComfyUI assumes it too)
SAMPLE_SIZE = 128  # diffusers' default; with pos_embed_max_size the position table is cropped per image
LAYOUTS = ("sai", "comfy", "full", "diffusers")

# a few small tensors standing in for the text encoders and VAE of SAI's all-in-one files ("full" layout)
_FULL_EXTRAS = {
    "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": (16, 8),
    "text_encoders.clip_g.transformer.text_model.embeddings.token_embedding.weight": (16, 8),
    "text_encoders.t5xxl.transformer.shared.weight": (16, 8),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    "first_stage_model.decoder.conv_in.weight": (8, 16, 3, 3),
}


@dataclass
class SD3CheckpointInfo:
    path: str
    layout: str             # "sai" (prefix or not) or "diffusers"
    config: dict            # SD3Transformer2DModel kwargs
    stored_dtypes: set = field(default_factory=set)  # of the transformer's tensors only
    variant: str = "sd3"    # "sd3-medium", "sd3.5-medium", "sd3.5-large", or "sd3" for other shapes
    full_checkpoint: bool = False  # the transformer sits beside text encoders / VAE; only it is read


_BLOCK = {"sai": "joint_blocks.", "diffusers": "transformer_blocks."}
_SHAPE_KEYS = {  # where each size is read off, per layout
    "sai": dict(patch="x_embedder.proj.weight", pos="pos_embed", ctx="context_embedder.weight",
                pooled="y_embedder.mlp.0.weight", out="final_layer.linear.weight",
                qn=re.compile(r"joint_blocks\.\d+\.x_block\.attn2?\.ln_q\.weight$"),
                attn2=re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.")),
    "diffusers": dict(patch="pos_embed.proj.weight", pos="pos_embed.pos_embed", ctx="context_embedder.weight",
                      pooled="time_text_embed.text_embedder.linear_1.weight", out="proj_out.weight",
                      qn=re.compile(r"transformer_blocks\.\d+\.attn2?\.norm_q\.weight$"),
                      attn2=re.compile(r"transformer_blocks\.(\d+)\.attn2\.")),
}


def detect_sd3_layout(keys) -> str | None:
    """'sai' or 'diffusers' for an SD3 / SD3.5 transformer's (prefix-stripped) keys, None for anything else.

    SAI: ``joint_blocks.N.`` and ``x_embedder.proj.weight``; diffusers: ``transformer_blocks.N.attn.to_q.weight``
    with ``pos_embed.proj.weight`` (Flux's diffusers layout has ``x_embedder.weight`` and no patch-embed conv).
    SD3 ControlNets share these keys but add ``controlnet_blocks.``: not a transformer, so None."""
    keys = set(keys)
    if any(k.startswith("controlnet_blocks.") for k in keys):
        return None
    if "x_embedder.proj.weight" in keys and any(re.match(r"joint_blocks\.\d+\.", k) for k in keys):
        return "sai"
    if "pos_embed.proj.weight" in keys and any(re.match(r"transformer_blocks\.\d+\.attn\.to_q\.weight$", k)
                                               for k in keys):
        return "diffusers"
    return None


def _shape(shapes: dict, key: str, ndim: int) -> tuple:
    shape = tuple(shapes[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"'{key}' has shape {shape}; expected a {ndim}-d tensor for an SD3 transformer")
    return shape


def sd3_config_from_shapes(shapes: dict, layout: str) -> dict:
    """SD3Transformer2DModel kwargs from tensor shapes alone (meta tensors do): patch size, channels and width
    from the patch-embed conv, head size from a q-norm weight (else 64), block count from the highest index,
    dual attention from the blocks having attn2, pos_embed_max_size from the position table's tokens."""
    names = _SHAPE_KEYS[layout]
    missing = [names[n] for n in ("patch", "pos", "ctx", "pooled", "out") if names[n] not in shapes]
    if missing:
        raise CheckpointError(f"missing keys needed to infer the SD3 model size: {missing}")
    hidden, in_channels, patch_size, patch_w = _shape(shapes, names["patch"], 4)
    if patch_size != patch_w:
        raise CheckpointError(f"'{names['patch']}' is a {patch_size}x{patch_w} conv; SD3 patches are square")
    qn = next((k for k in shapes if names["qn"].match(k)), None)
    head_dim = _shape(shapes, qn, 1)[0] if qn is not None else HEAD_DIM
    if hidden % head_dim:
        raise CheckpointError(f"width {hidden} is not a multiple of the attention head size {head_dim}")
    tokens = _shape(shapes, names["pos"], 3)[1]
    max_size = math.isqrt(tokens)
    if max_size * max_size != tokens:
        raise CheckpointError(f"'{names['pos']}' holds {tokens} positions; expected a square grid of them")
    ctx, out = _shape(shapes, names["ctx"], 2), _shape(shapes, names["out"], 2)
    dual = sorted({int(m.group(1)) for k in shapes if (m := names["attn2"].match(k))})
    return dict(sample_size=SAMPLE_SIZE, patch_size=patch_size, in_channels=in_channels,
                num_layers=num_blocks(shapes, _BLOCK[layout]), attention_head_dim=head_dim,
                num_attention_heads=hidden // head_dim, joint_attention_dim=ctx[1],
                caption_projection_dim=ctx[0], pooled_projection_dim=_shape(shapes, names["pooled"], 2)[1],
                out_channels=out[0] // (patch_size * patch_size), pos_embed_max_size=max_size,
                dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qn is not None else None)


def sd3_variant(config: dict) -> str:
    """Which release the shapes are built like: MMDiT-X dual attention -> 'sd3.5-medium', q/k RMSNorm alone ->
    'sd3.5-large', neither -> 'sd3-medium'; 'sd3' for other combinations (dual attention without q/k norm).
    Structure only, not width, so reduced-width models of the same build name their release."""
    dual, qk = bool(config["dual_attention_layers"]), config["qk_norm"] is not None
    return {(True, True): "sd3.5-medium", (False, True): "sd3.5-large", (False, False): "sd3-medium"}.get(
        (dual, qk), "sd3")


def _rules(config: dict) -> list[tuple[str, list[str], str]]:
    """(SAI key, [diffusers keys], op) for every tensor of the config's model; op is 'copy', 'qkv' (fused rows,
    chunked in three) or 'swap' (SAI's shift, scale halves vs diffusers' scale, shift). The table behind the
    inverse, stage residency and storage dtypes; the forward direction is diffusers' converter."""
    def lin(sai, diffusers, op="copy"):
        ds = diffusers if isinstance(diffusers, list) else [diffusers]
        return [(f"{sai}.{p}", [f"{d}.{p}" for d in ds], op) for p in ("weight", "bias")]

    r = [("pos_embed", ["pos_embed.pos_embed"], "copy")]
    for sai, d in (("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
                   ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                   ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                   ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                   ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")):
        r += lin(sai, d)
    n, qk = config["num_layers"], config["qk_norm"] is not None
    for i in range(n):
        x, c, d = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        last = i == n - 1
        r += lin(x + "attn.qkv", [f"{d}attn.to_{q}" for q in "qkv"], "qkv")
        r += lin(c + "attn.qkv", [f"{d}attn.add_{q}_proj" for q in "qkv"], "qkv")
        if qk:
            r += [(x + "attn.ln_q.weight", [d + "attn.norm_q.weight"], "copy"),
                  (x + "attn.ln_k.weight", [d + "attn.norm_k.weight"], "copy"),
                  (c + "attn.ln_q.weight", [d + "attn.norm_added_q.weight"], "copy"),
                  (c + "attn.ln_k.weight", [d + "attn.norm_added_k.weight"], "copy")]
        r += lin(x + "attn.proj", d + "attn.to_out.0")
        if i in config["dual_attention_layers"]:
            r += lin(x + "attn2.qkv", [f"{d}attn2.to_{q}" for q in "qkv"], "qkv")
            if qk:
                r += [(x + "attn2.ln_q.weight", [d + "attn2.norm_q.weight"], "copy"),
                      (x + "attn2.ln_k.weight", [d + "attn2.norm_k.weight"], "copy")]
            r += lin(x + "attn2.proj", d + "attn2.to_out.0")
        r += lin(x + "adaLN_modulation.1", d + "norm1.linear")
        # the last block only conditions on the text (context_pre_only): no text output projection or MLP
        r += lin(c + "adaLN_modulation.1", d + "norm1_context.linear", "swap" if last else "copy")
        r += lin(x + "mlp.fc1", d + "ff.net.0.proj") + lin(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            r += lin(c + "attn.proj", d + "attn.to_add_out")
            r += lin(c + "mlp.fc1", d + "ff_context.net.0.proj") + lin(c + "mlp.fc2", d + "ff_context.net.2")
    r += lin("final_layer.linear", "proj_out") + lin("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return r


def _check_keys(expected, keys, config, names="SAI"):
    """Missing / unexpected keys, in the file's own names."""
    keys, expected = set(keys), list(expected)
    missing = [k for k in expected if k not in keys]
    if missing:
        raise CheckpointError(f"{len(missing)} keys missing for an SD3 transformer with {config['num_layers']} "
                              f"blocks ({names} layout), e.g. {missing[:5]}")
    left = sorted(keys - set(expected))
    if left:
        raise CheckpointError(f"{len(left)} unexpected keys for an SD3 transformer, e.g. {left[:5]}")


def _check_shapes(expected: dict, sd: dict):
    bad = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"tensor shapes do not fit the inferred SD3 config, e.g. {bad[:3]}")


def _convert(sd: dict) -> dict:
    """SAI -> diffusers keys through diffusers' converter (on a copy: it pops from the dict it is given)."""
    try:
        return convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))
    except KeyError as e:  # only if the key check above missed something the converter wants
        raise CheckpointError(f"key {e} missing for an SD3 transformer") from e


def sai_from_diffusers(sd: dict) -> dict:
    """Exact inverse of diffusers' SAI -> diffusers converter: diffusers keys -> SAI keys (no prefix)."""
    config = sd3_config_from_shapes(sd, "diffusers")
    rules = _rules(config)
    _check_keys([d for _, ds, _ in rules for d in ds], sd, config, "diffusers")
    dim = config["caption_projection_dim"]  # what the converter passes; swapping two halves is its own inverse
    return {sai: (torch.cat([sd[d] for d in ds]) if op == "qkv" else
                  swap_scale_shift(sd[ds[0]], dim) if op == "swap" else sd[ds[0]])
            for sai, ds, op in rules}


def read_sd3_info(path) -> SD3CheckpointInfo:
    """Layout, config, variant and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, SD3_EXPECTED)
    keys, prefix = diffusion_model_keys(header)  # a ComfyUI / SAI full file: only the diffusion model
    keys, _scales = scaled_fp8_keys(keys)  # ComfyUI's scaled fp8: the scales travel beside their weights
    shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
    layout = detect_sd3_layout(shapes)
    if layout is None:
        if not shapes:
            raise CheckpointError(f"contains no tensors; expected {SD3_EXPECTED}")
        flux = any(k.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for k in shapes)
        raise CheckpointError("does not look like an SD3 / SD3.5 transformer: no 'joint_blocks.*' or "
                              "'transformer_blocks.*' + 'pos_embed.proj.*' keys (found keys like "
                              f"{key_sample(shapes)}); "
                              + ("this looks like a Flux.1 transformer" if flux else guess_content(shapes)))
    config = sd3_config_from_shapes(shapes, layout)
    info = SD3CheckpointInfo(path=path, layout=layout, config=config, stored_dtypes=stored_dtypes(header, keys),
                             variant=sd3_variant(config), full_checkpoint=bool(prefix) and len(keys) < len(header))
    return info, prefix, shapes


def load_sd3_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None, progress=None):
    """Load an SD3 / SD3.5 transformer file; returns (SD3Transformer2DModel in eval mode, SD3CheckpointInfo).

    fp8: the blocks' Linear weights are kept in float8_e4m3fn (as stored in an fp8 file, plain-cast from any
    other) and upcast to ``dtype`` per layer (models/fp8.py); everything else is ``dtype``.
    stage: (start, stop), a PipeFusion block range; only those blocks, plus the embedders if start == 0 and
    the head if stop is the last block, are read (SD3_BLOCKS.keep_stage).
    progress(bytes read, bytes to read), if given, after each tensor read."""
    from diffusers import SD3Transformer2DModel

    path = os.fspath(path)
    try:
        info, prefix, shapes = _inspect(path)
        config, layout = info.config, info.layout
        with torch.device("meta"):  # no weight allocation; real tensors are assigned below
            model = SD3Transformer2DModel(**config)
        # Validate the whole file on header shapes first, so a bad file fails before gigabytes are read.
        rules = _rules(config)
        if layout == "sai":
            _check_keys([s for s, _, _ in rules], shapes, config)
            converted = _convert(shapes)
        else:
            converted = shapes
        _check_keys(model.state_dict(), converted, config, "diffusers")
        _check_shapes(model.state_dict(), converted)
        if stage is not None:
            SD3_BLOCKS.keep_stage(model, *stage)
        if fp8:
            SD3_BLOCKS.store_fp8(model)
        # the resident tensors, each in the dtype it is kept in; fp8 ones are read as stored or cast once.
        # diffusers' converter only chunks and concatenates, which float8 tensors support, so fp8 reads need
        # no compute-dtype detour.
        want = {k: FP8 if v.dtype == FP8 else dtype for k, v in model.state_dict().items()}
        reads = {s: want[ds[0]] for s, ds, _ in rules if ds[0] in want} if layout == "sai" else want
        scales = scaled_fp8_keys(diffusion_model_keys(read_header(path, SD3_EXPECTED))[0])[1]
        sd = read_tensors(path, [prefix + k for k in reads], dtype={prefix + k: t for k, t in reads.items()},
                          device=device, progress=progress, expected=SD3_EXPECTED, scales=scales)
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        if layout == "sai":
            # Other stages' tensors go in as header-shaped meta placeholders so the converter sees a whole
            # file; whatever comes out still on meta belongs to another stage and is dropped.
            sd = {k: v for k, v in _convert({**shapes, **sd}).items() if not v.is_meta}
    except CheckpointError as e:
        raise with_path(path, e) from e
    return assign_state_dict(model, sd, path), info


def write_sd3_checkpoint(model, path, layout: str = "sai", dtype=None):
    """Save ``model`` as a single-file checkpoint: 'sai', 'comfy' (SAI keys under model.diffusion_model.),
    'full' (that plus small stand-in text-encoder and VAE tensors, as SAI's all-in-one files) or 'diffusers'."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout != "diffusers":
        sd = sai_from_diffusers(sd)
    prefix = COMFY_PREFIX if layout in ("comfy", "full") else ""
    # clone: save_file rejects tensors that share storage
    sd = {prefix + k: v.to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}
    if layout == "full":
        for k, shape in _FULL_EXTRAS.items():
            n = math.prod(shape)
            sd[k] = (torch.arange(n, dtype=torch.float32) / n).reshape(shape).to(dtype or torch.float32)
    save_file(sd, os.fspath(path))
    return path
