"""Load HunyuanDiT (v1.0 / v1.1 / v1.2) transformer single-file checkpoints into diffusers' HunyuanDiT2DModel.

Accepted layouts: the original HunyuanDiT keys (``blocks.N.attn1.Wqkv.weight``, ``mlp_t5.0``, ``pooler.*``,
``extra_embedder.0``, ``final_layer.adaLN_modulation.1``), as Tencent's files and ComfyUI's model hold them, also
under ComfyUI's ``model.diffusion_model.`` prefix (its all-in-one checkpoints); and diffusers keys
(``blocks.N.attn1.to_q.weight``, ``time_extra_emb.pooler.*``, ``text_embedder.linear_1``). Storage bf16 / fp16 /
fp32 / fp8_e4m3fn, and ComfyUI's scaled fp8 (a ``scaled_fp8`` marker and per-Linear ``scale_weight``),
dequantised on the way in. diffusers has no single-file converter for HunyuanDiT, so the renaming is this module's
table (``_rules``): a renaming, except that

- the self-attention's fused ``Wqkv`` and the cross-attention's fused ``kv_proj`` are split by rows, in that order,
  into to_q / to_k / to_v (to_k / to_v);
- the block norms trade names: the original ``norm3`` (before cross-attention) is diffusers' ``norm2`` and the
  original ``norm2`` (before the MLP) diffusers' ``norm3``;
- the final modulation's two halves trade places: the original ``final_layer.adaLN_modulation.1`` gives (shift,
  scale), diffusers' ``norm_out.linear`` (scale, shift).

The config comes from tensor shapes: the head size from the q-norm's width (ComfyUI assumes 16 heads; every
release has 16 of 88 or 72), the MLP width from fc1, the text lengths from the learned padding rows and the
pooler's positions (ComfyUI assumes 77 + 256), the style / image-size conditions (v1.0 / v1.1) iff
``style_embedder`` is there (ComfyUI's test: the extra embedder's input width). The table runs on meta tensors
first, so a bad file fails before anything is read, and a PipeFusion stage would read only its own tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..blocks import BlockLayout
from ..checkpoint import (COMFY_PREFIX, CheckpointError, assign_state_dict, checked_meta_model, diffusion_model_keys,
                          guess_content, key_sample, meta_shapes, num_blocks, read_header, read_tensors,
                          resident_dtypes, scaled_fp8_keys, scaled_fp8_renamed, scaled_fp8_state_dict, stored_dtypes,
                          with_path)

# The text projection (text_embedder), the learned text padding and the time / pooled-text / size / style
# embedding (time_extra_emb) stay on every stage: each block takes the modulation and cross-attends to the text.
# The patch embedder runs on the first stage.
HUNYUAN_DIT_BLOCKS = BlockLayout(containers=("blocks",), embedders=("pos_embed",), head=("norm_out", "proj_out"))
HUNYUAN_DIT_EXPECTED = "a HunyuanDiT transformer checkpoint"
LAYOUTS = ("hydit", "comfy", "diffusers")
META_SIZE = 6            # image_meta_size: height, width, target height, target width, crop top, crop left
SIZE_FREQ = 256          # sinusoidal channels per image-size entry (and the timestep)
# (width, blocks, style / size conditions) of the releases; anything else is "hunyuan-dit"
VARIANTS = {(1408, 40, False): "hunyuan-dit-v1.2", (1408, 40, True): "hunyuan-dit-v1.1"}

# original module -> diffusers module (weight and bias alike), outside the blocks
_TOP = {"mlp_t5.0": "text_embedder.linear_1",
        "mlp_t5.2": "text_embedder.linear_2",
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
        "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
        "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
        "pooler.q_proj": "time_extra_emb.pooler.q_proj",
        "pooler.k_proj": "time_extra_emb.pooler.k_proj",
        "pooler.v_proj": "time_extra_emb.pooler.v_proj",
        "pooler.c_proj": "time_extra_emb.pooler.c_proj",
        "final_layer.linear": "proj_out"}
# single tensors outside the blocks
_TENSORS = {"text_embedding_padding": "text_embedding_padding",
            "pooler.positional_embedding": "time_extra_emb.pooler.positional_embedding",
            "style_embedder.weight": "time_extra_emb.style_embedder.weight"}
# inside block N (blocks.N. on both sides): one-to-one modules (the skip modules only on the second half's)
_BLOCK = {"norm1": "norm1.norm", "default_modulation.1": "norm1.linear",
          "attn1.q_norm": "attn1.norm_q", "attn1.k_norm": "attn1.norm_k", "attn1.out_proj": "attn1.to_out.0",
          "norm3": "norm2",  # before cross-attention
          "attn2.q_proj": "attn2.to_q", "attn2.q_norm": "attn2.norm_q", "attn2.k_norm": "attn2.norm_k",
          "attn2.out_proj": "attn2.to_out.0",
          "norm2": "norm3",  # before the MLP
          "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
          "skip_norm": "skip_norm", "skip_linear": "skip_linear"}
_FUSED = {"attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn2.kv_proj": ("attn2.to_k", "attn2.to_v")}
# the final modulation: (shift, scale) in the original, (scale, shift) in diffusers
_SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}


@dataclass
class HunyuanDiTCheckpointInfo:
    path: str
    layout: str              # "hydit" (original keys, with or without ComfyUI's prefix) or "diffusers"
    config: dict             # HunyuanDiT2DModel kwargs
    stored_dtypes: set = field(default_factory=set)
    variant: str = "hunyuan-dit"
    scaled_fp8: bool = False  # ComfyUI's scaled fp8: weights were dequantised (stored * scale_weight)


def detect_hunyuan_dit_layout(keys) -> str | None:
    """'hydit' or 'diffusers' for a HunyuanDiT transformer's (prefix-stripped) keys, None for anything else. The
    original layout is ComfyUI's own test (mlp_t5) with the fused self-attention; diffusers' needs the pooled-text
    embedding and the T5 projection with split attention."""
    keys = set(keys)
    if "mlp_t5.0.weight" in keys and any(re.match(r"blocks\.\d+\.attn1\.Wqkv\.weight$", k) for k in keys):
        return "hydit"
    if ("time_extra_emb.pooler.positional_embedding" in keys and "text_embedder.linear_1.weight" in keys
            and any(re.match(r"blocks\.\d+\.attn1\.to_q\.weight$", k) for k in keys)):
        return "diffusers"
    return None


def _rules(num_layers: int) -> list[tuple[str, list[str], str]]:
    """(original key, [diffusers keys], op) for every tensor a HunyuanDiT of num_layers blocks may hold: op 'copy',
    'split' (the rows of a fused tensor in equal parts, in the targets' order) or 'swap' (its two row halves trade
    places). A model without the skip modules or the style embedder simply has no such keys."""
    out = [(o, [d], "copy") for o, d in _TENSORS.items()]
    for o, d in _TOP.items():
        out += [(f"{o}.{p}", [f"{d}.{p}"], "copy") for p in ("weight", "bias")]
    for o, d in _SWAPPED.items():
        out += [(f"{o}.{p}", [f"{d}.{p}"], "swap") for p in ("weight", "bias")]
    for i in range(num_layers):
        b = f"blocks.{i}."
        for o, d in _BLOCK.items():
            out += [(f"{b}{o}.{p}", [f"{b}{d}.{p}"], "copy") for p in ("weight", "bias")]
        for o, ds in _FUSED.items():
            out += [(f"{b}{o}.{p}", [f"{b}{d}.{p}" for d in ds], "split") for p in ("weight", "bias")]
    return out


def _part(t: torch.Tensor, op: str, j: int, n: int) -> torch.Tensor:
    """Part j of n of a file tensor under op: itself ('copy'), a row range ('split', a view) or the halves swapped."""
    if op == "copy":
        return t
    rows = t.shape[0] // n if op == "split" else t.shape[0] // 2
    if op == "split":
        return t[j * rows:(j + 1) * rows]
    return torch.cat([t[rows:], t[:rows]], dim=0)


def _renaming(shapes: dict) -> dict:
    """diffusers key -> (original key, op, part, parts) for an original-layout file's tensors (shapes: key ->
    anything with .shape, e.g. meta tensors); anything unknown refused."""
    rules = {o: (ds, op) for o, ds, op in _rules(num_blocks(shapes, "blocks."))}
    unknown = sorted(k for k in shapes if k not in rules)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys for a HunyuanDiT transformer, e.g. {unknown[:5]}")
    out = {}
    for k, v in shapes.items():
        ds, op = rules[k]
        parts = len(ds) if op == "split" else 2 if op == "swap" else 1
        if op != "copy" and (v.dim() not in (1, 2) or v.shape[0] % parts):
            raise CheckpointError(f"'{k}' has shape {tuple(v.shape)}; expected rows in {parts} equal parts")
        for j, d in enumerate(ds):
            out[d] = (k, op, j, len(ds))
    return out


def diffusers_from_original(sd: dict) -> dict:
    """Original HunyuanDiT keys -> diffusers keys (fused tensors split by rows, as views; the final modulation's
    halves swapped). Works on real or meta tensors; refuses unknown keys."""
    return {d: _part(sd[o], op, j, n) for d, (o, op, j, n) in _renaming(sd).items()}


def original_from_diffusers(sd: dict) -> dict:
    """diffusers keys -> original HunyuanDiT keys (to_q / to_k / to_v fused back in row order, the final
    modulation's halves swapped back): the exact inverse of diffusers_from_original."""
    rules = _rules(num_blocks(sd, "blocks."))
    taken = {d for _, ds, _ in rules for d in ds}
    left = sorted(k for k in sd if k not in taken)
    if left:
        raise CheckpointError(f"{len(left)} diffusers keys have no original HunyuanDiT name, e.g. {left[:5]}")
    out = {}
    for o, ds, op in rules:
        present = [d in sd for d in ds]
        if not any(present):
            continue
        if not all(present):
            raise CheckpointError(f"'{o}' needs all of {ds}; the state dict has only some")
        out[o] = torch.cat([sd[d] for d in ds], dim=0) if op == "split" else _part(sd[ds[0]], op, 0, 1)
    return out


def _shape(shapes: dict, key: str, ndim: int) -> tuple:
    if key not in shapes:
        raise CheckpointError(f"key '{key}' missing; needed to infer the HunyuanDiT model size")
    shape = tuple(shapes[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"'{key}' has shape {shape}; expected a {ndim}-d tensor for a HunyuanDiT transformer")
    return shape


def mlp_ratio(width: int, inner: int) -> float:
    """A ratio r with int(width * r) == inner (diffusers' rule for the MLP width): inner / width, nudged where float
    rounding would truncate it (DiT-g/2's 6144 / 1408; ComfyUI writes 4.3637)."""
    r = inner / width
    return r if int(width * r) == inner else (inner + 0.5) / width


def hunyuan_dit_config_from_shapes(shapes: dict) -> dict:
    """HunyuanDiT2DModel kwargs from diffusers-named tensor shapes (meta tensors do)."""
    width, in_channels, patch, patch_w = _shape(shapes, "pos_embed.proj.weight", 4)
    if patch != patch_w:
        raise CheckpointError(f"the patch embedder's kernel is {patch}x{patch_w}; HunyuanDiT's patches are square")
    head_dim = _shape(shapes, "blocks.0.attn1.norm_q.weight", 1)[0]
    if width % head_dim or head_dim % 4:
        raise CheckpointError(f"the q-norm's width {head_dim} is not a head size of width {width} (a multiple of 4 "
                              "dividing it: the 2-D RoPE takes a quarter per axis and pair)")
    out = _shape(shapes, "proj_out.weight", 2)[0]
    if out not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise CheckpointError(f"proj_out has {out} rows; expected {patch}x{patch} patches of {in_channels} or "
                              f"{2 * in_channels} (learned sigma) channels")
    layers = num_blocks(shapes, "blocks.")
    if layers % 2:
        raise CheckpointError(f"{layers} blocks: HunyuanDiT's long skips pair the first half's blocks with the "
                              "second half's, so the depth must be even")
    padding_rows, text_dim = _shape(shapes, "text_embedding_padding", 2)
    pool_rows, t5_dim = _shape(shapes, "time_extra_emb.pooler.positional_embedding", 2)
    if padding_rows < pool_rows:
        raise CheckpointError(f"the text padding has {padding_rows} rows, fewer than the {pool_rows - 1} mT5 tokens "
                              "the pooler takes")
    cross = _shape(shapes, "blocks.0.attn2.to_k.weight", 2)[1]
    proj = _shape(shapes, "text_embedder.linear_2.weight", 2)[0]
    if cross != text_dim or proj != text_dim:
        raise CheckpointError(f"cross-attention takes {cross} and the mT5 projection gives {proj} values per text "
                              f"token; the text padding's width {text_dim} needs both")
    inner = _shape(shapes, "blocks.0.ff.net.0.proj.weight", 2)[0]
    return dict(num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=in_channels,
                patch_size=patch, activation_fn="gelu-approximate", sample_size=128, hidden_size=width,
                num_layers=layers, mlp_ratio=mlp_ratio(width, inner),
                learn_sigma=out == 2 * patch * patch * in_channels, cross_attention_dim=text_dim,
                norm_type="layer_norm", cross_attention_dim_t5=t5_dim,
                pooled_projection_dim=_shape(shapes, "time_extra_emb.pooler.c_proj.weight", 2)[0],
                text_len=padding_rows - (pool_rows - 1), text_len_t5=pool_rows - 1,
                use_style_cond_and_image_meta_size="time_extra_emb.style_embedder.weight" in shapes)


def hunyuan_dit_variant(config: dict) -> str:
    key = (config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"],
           bool(config["use_style_cond_and_image_meta_size"]))
    return VARIANTS.get(key, "hunyuan-dit")


def read_hunyuan_dit_info(path) -> HunyuanDiTCheckpointInfo:
    """Layout, config, variant and stored dtypes from the header alone (no tensor is read)."""
    path = os.fspath(path)
    try:
        return _inspect(path)[0]
    except CheckpointError as e:
        raise with_path(path, e) from e


def _inspect(path):
    header = read_header(path, HUNYUAN_DIT_EXPECTED)
    keys, prefix = diffusion_model_keys(header)
    keys, scales = scaled_fp8_keys(keys)
    shapes = {k[len(prefix):]: v for k, v in meta_shapes(header, keys).items()}
    layout = detect_hunyuan_dit_layout(shapes)
    if layout is None:
        if not shapes:
            raise CheckpointError(f"contains no tensors; expected {HUNYUAN_DIT_EXPECTED}")
        raise CheckpointError("does not look like a HunyuanDiT transformer: no 'mlp_t5.0.weight' with "
                              "'blocks.N.attn1.Wqkv.*' keys, nor 'time_extra_emb.pooler.*' with 'text_embedder.*' and "
                              f"'blocks.N.attn1.to_q.*' (found keys like {key_sample(shapes)}); "
                              f"{guess_content(shapes)}")
    if layout == "hydit":
        names = _renaming(shapes)  # diffusers key -> (file key, op, part, parts)
    else:
        names = {k: (k, "copy", 0, 1) for k in shapes}
    diff_shapes = {d: _part(shapes[o], op, j, n) for d, (o, op, j, n) in names.items()}
    config = hunyuan_dit_config_from_shapes(diff_shapes)
    info = HunyuanDiTCheckpointInfo(path=path, layout=layout, config=config, variant=hunyuan_dit_variant(config),
                                    stored_dtypes=stored_dtypes(header, keys), scaled_fp8=bool(scales))
    return info, prefix, names, diff_shapes, scales


def load_hunyuan_dit_transformer(path, dtype=torch.bfloat16, device="cpu", fp8: bool = False, stage=None,
                                 progress=None):
    """Load a HunyuanDiT transformer file; returns (HunyuanDiT2DModel in eval mode, HunyuanDiTCheckpointInfo).

    fp8: the blocks' Linear weights kept in float8_e4m3fn (models/fp8.py; a scaled-fp8 file's weights are
    dequantised first, then plain-cast, as any other file's). stage: (start, stop), a block range; only its tensors
    are read. progress(bytes read, bytes to read) after each tensor."""
    from diffusers import HunyuanDiT2DModel

    path = os.fspath(path)
    try:
        info, prefix, names, diff_shapes, scales = _inspect(path)
        model = checked_meta_model(HunyuanDiT2DModel, info.config, diff_shapes, "HunyuanDiT")
        HUNYUAN_DIT_BLOCKS.make_resident(model, stage, fp8)
        # a fused file tensor is read once, in its parts' dtype (all fp8 or none)
        want = resident_dtypes(model, dtype)
        reads = {prefix + names[k][0]: t for k, t in want.items()}
        sd = read_tensors(path, list(reads), dtype=reads, device=device, progress=progress,
                          expected=HUNYUAN_DIT_EXPECTED, scales=scales)
        sd = {k: _part(sd[prefix + names[k][0]], *names[k][1:]) for k in want}
    except CheckpointError as e:
        raise with_path(path, e) from e
    return assign_state_dict(model, sd, path), info


def write_hunyuan_dit_checkpoint(model, path, layout: str = "hydit", dtype=None, scaled_fp8: bool = False):
    """Save ``model`` as one file: 'hydit' (original keys, as Tencent's files), 'comfy' (those under
    model.diffusion_model.) or 'diffusers'. scaled_fp8: as ComfyUI's scaled-fp8 files (every Linear weight in fp8
    over its absmax scale, a fused Wqkv / kv_proj with one scale, biases plain fp8, the marker)."""
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
    prefix = COMFY_PREFIX if layout == "comfy" else ""
    save_file({prefix + k: v.contiguous().clone() for k, v in out.items()}, os.fspath(path))
    return path


def _scaled_fp8_original(model, original: dict, dtype) -> dict:
    """ComfyUI's scaled fp8 of an original-layout state dict (models/checkpoint.scaled_fp8_renamed): a fused
    Wqkv / kv_proj weight is one Linear there, scaled whole."""
    return scaled_fp8_renamed(model, original, {d: o for o, ds, _ in _rules(model.config.num_layers) for d in ds},
                              dtype)