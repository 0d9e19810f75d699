"""Flux.1 LoRAs: parse the file formats ComfyUI accepts and merge them into a diffusers Flux model in place.

Formats: kohya/ComfyUI (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.alpha``), BFL dotted
names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``), diffusers/peft
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, optional ``base_model.model.`` prefix),
OneTrainer/SimpleTuner (``lora_transformer_*``, ``lycoris_*``) and XLabs
(``double_blocks.0.processor.qkv_lora1.down.weight``).
Full-delta ``.diff`` (weights) and ``.diff_b`` (biases) entries are applied as well. BFL names go through the
checkpoint loader's BFL->diffusers table, so a LoRA on a fused weight (qkv, linear1) is split by rows exactly
like the weight it patches. Text-encoder keys are counted and skipped: the text encoders are not ours.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import NamedTuple

import torch
from safetensors import safe_open

from ..checkpoint import num_blocks
from ..lora import LoraError, LoraMerger, LoraPatch, dense, model_shapes  # noqa: F401  (re-exported)
from .checkpoint import _rules, _swap


class FluxLora(dict):
    """diffusers parameter name -> LoraPatch, plus where it came from and what was skipped."""

    def __init__(self, patches=(), path="", format="", text_encoder_keys=0):
        super().__init__(patches)
        self.path, self.format, self.text_encoder_keys = path, format, text_encoder_keys


# (down, up) suffix pairs, as ComfyUI's LoRA loader accepts them; longest first so none shadows another
_PAIRS = [(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          (".lora_A.default.weight", ".lora_B.default.weight"), (".lora_down.weight", ".lora_up.weight"),
          (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
          (".lora_A.weight", ".lora_B.weight"), (".lora_A", ".lora_B")]
_SINGLE = {".alpha": "alpha", ".diff_b": "diff_b", ".diff": "diff", ".w_norm": "diff", ".b_norm": "diff_b"}
_UNSUPPORTED = (".dora_scale", ".lora_mid.weight", "hada_w", "lokr_w", ".set_weight", ".reshape_weight")
_TEXT = ("lora_te", "text_encoder")  # kohya lora_te/te1/te2, diffusers text_encoder(_2), ComfyUI text_encoders
_STRIP = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_UNDERSCORE = ("lora_unet_", "lora_transformer_", "lycoris_")
_BFL_TOP = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
# XLabs processor LoRAs -> BFL modules; single-block qkv_lora patches only the qkv rows of linear1
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)"
                    r"\.(down|up)\.weight$")
_XLABS_MAP = {("double", "qkv", "1"): "img_attn.qkv", ("double", "qkv", "2"): "txt_attn.qkv",
              ("double", "proj", "1"): "img_attn.proj", ("double", "proj", "2"): "txt_attn.proj",
              ("single", "qkv", ""): "linear1_qkv", ("single", "proj", ""): "linear2"}
_FAMILY = [(("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("joint_blocks",), "SD3"), (("double_stream_modulation", "single_stream_modulation"), "Flux.2")]


def _targets(shapes) -> dict:
    """LoRA module name (BFL or diffusers, dots or underscores) -> {'weight'|'bias': ([diffusers keys], op)}."""
    keys = list(shapes)
    rules = _rules(num_blocks(keys, "transformer_blocks."), num_blocks(keys, "single_transformer_blocks."),
                   "time_text_embed.guidance_embedder.linear_1.weight" in shapes)
    rules = [r for r in rules if all(d in shapes for d in r[1])] + [(k, [k], "copy") for k in keys]
    for i in range(num_blocks(keys, "single_transformer_blocks.")):  # ComfyUI's name for the qkv rows of linear1
        d = f"single_transformer_blocks.{i}.attn.to_"
        rules += [(f"single_blocks.{i}.linear1_qkv.{s}", [f"{d}{x}.{s}" for x in "qkv"], "split")
                  for s in ("weight", "bias")]
    out = {}
    for key, ds, op in rules:
        mod, suffix = key.rsplit(".", 1)
        out.setdefault(mod, {})["weight" if suffix == "scale" else suffix] = (ds, op)
        if suffix not in ("weight", "bias"):  # ComfyUI also names norm scales in full: '<...>.query_norm.scale.diff'
            out.setdefault(key, {})["weight"] = (ds, op)
    out.update({m.replace(".", "_"): t for m, t in list(out.items())})
    return out


def _module_name(name: str, targets) -> str | None:
    stripped = True
    while stripped:
        stripped = False
        for p in _STRIP:
            if name.startswith(p) and name[len(p):]:
                name, stripped = name[len(p):], True
    for p in _UNDERSCORE:
        if name.startswith(p):
            name = name[len(p):]
            break
    return name if name in targets else None


def _split_key(key):
    """(module, kind, is_xlabs) with kind down/up/alpha/diff/diff_b; kind None for anything else."""
    if m := _XLABS.match(key):
        kind, i, proj, n, d = m.groups()
        return f"{kind}_blocks.{i}.{_XLABS_MAP.get((kind, proj, n), 'unknown_xlabs')}", d, "xlabs"
    for down, up in _PAIRS:
        for suffix, kind in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                return key[:-len(suffix)], kind, None
    for suffix, kind in _SINGLE.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], kind, None
    return key, None, None


def _style(module: str, name: str, xlabs) -> str:
    if xlabs:
        return "xlabs"
    if module.startswith("lora_unet_"):
        return "kohya"
    if module.startswith(("lora_transformer_", "lycoris_")):
        return "onetrainer"
    return "bfl" if name.startswith(_BFL_TOP) else "diffusers"


def _family_hint(names, otherwise="is it a LoRA for another model (SDXL, SD3, Flux.2)?") -> str:
    for words, family in _FAMILY:
        if any(w in n for n in names for w in words):
            return f"this looks like a LoRA for {family}, not Flux.1"
    return otherwise


def _read(path) -> dict:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # clone: never alias the file mapping
    except Exception as e:  # safetensors raises its own SafetensorError plus OS errors
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({type(e).__name__}: {e})") from e


def _misfit(name, ent, shapes, down, up):
    """Why a LoRA entry does not fit its target (None if it does); ``up`` is the delta when ``down`` is None."""
    ds, op = ent
    s = [shapes[d] for d in ds]
    rows = sum(x[0] for x in s) if op == "split" else s[0][0]
    want = (rows, *s[0][1:])
    if down is None:
        return None if tuple(up.shape) == want else f"{name!r} has shape {tuple(up.shape)}, model has {want}"
    if len(want) != 2:
        return f"{name!r} is a low-rank LoRA on a {len(want)}-D tensor of shape {want}"
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"{name!r} has inconsistent down/up shapes {tuple(down.shape)}, {tuple(up.shape)}"
    if down.shape[1] != want[1]:
        return f"{name!r} expects {down.shape[1]} inputs, model has {want[1]}"
    if up.shape[0] != want[0]:
        return f"{name!r} has {up.shape[0]} outputs, model has {want[0]}"
    return None


def _add(out, key, patch):
    if key not in out:
        out[key] = patch
        return
    old = out[key]  # the same tensor named twice in one file: both apply, as in ComfyUI
    if old.down is not None and patch.down is not None:  # stay low-rank: stack the ranks, scales folded into up
        out[key] = LoraPatch(torch.cat([old.down.float(), patch.down.float()]),
                             torch.cat([old.up.float() * old.scale, patch.up.float() * patch.scale], 1), 1.0)
    else:
        out[key] = LoraPatch(None, dense(old) + dense(patch), 1.0)


def load_flux_lora(path, model_state_shapes: dict) -> FluxLora:
    """Parse a Flux LoRA file into {diffusers parameter name: LoraPatch}, checked against the model's shapes.

    Scale is alpha / rank (1.0 without an alpha, as ComfyUI does). Raises LoraError naming the file for
    unreadable files, keys that are not Flux transformer weights and LoRA shapes that do not fit."""
    path = os.fspath(path)
    sd = _read(path)
    targets = _targets(model_state_shapes)
    groups, unknown, unsupported, text, styles = {}, [], [], 0, set()
    for key, t in sd.items():
        if key.startswith(_TEXT):
            text += 1
            continue
        if any(u in key for u in _UNSUPPORTED):
            unsupported.append(key)
            continue
        mod, kind, xlabs = _split_key(key)
        name = _module_name(mod, targets) if kind else None
        if name is None:
            unknown.append(key)
            continue
        styles.add(_style(mod, name, xlabs))
        groups.setdefault((name, mod), {})[kind] = t
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not LoRA weights for this Flux.1 transformer "
                        f"(e.g. {unknown[:3]}); {_family_hint(unknown)}")
    if unsupported:
        hint = _family_hint(unsupported, "only plain LoRA (down/up, alpha, diff, diff_b) can be merged")
        raise LoraError(f"{path}: {len(unsupported)} keys use a LoRA type that is not supported "
                        f"(DoRA/LoCon/LoHa/LoKr/set-weight), e.g. {unsupported[:3]}; {hint}")
    if not groups and not text:
        raise LoraError(f"{path}: contains no LoRA weights")
    out, misfits = FluxLora(path=path, format="+".join(sorted(styles)), text_encoder_keys=text), []
    for (name, mod), g in groups.items():
        t = targets[name]
        lowrank = "down" in g or "up" in g
        if lowrank and not ("down" in g and "up" in g):
            misfits.append(f"{mod!r} has only a {'down' if 'down' in g else 'up'} weight")
            continue
        items = ([("weight", g["down"], g["up"])] if lowrank else []) + \
                [(s, None, g[k]) for k, s in (("diff", "weight"), ("diff_b", "bias")) if k in g]
        if not items:
            misfits.append(f"{mod!r} has an alpha but no weights")
            continue
        for suffix, down, up in items:
            if suffix not in t:
                misfits.append(f"{mod!r} patches a {suffix} the model does not have")
                continue
            if why := _misfit(mod, t[suffix], model_state_shapes, down, up):
                misfits.append(why)
                continue
            ds, op = t[suffix]
            scale = float(g["alpha"].item()) / down.shape[0] if down is not None and "alpha" in g else 1.0
            # rows of B (or of a full delta) are split/swapped exactly like the fused weight's rows
            parts = ([_swap(up)] if op == "swap" else up.split([model_state_shapes[d][0] for d in ds])
                     if op == "split" else [up])
            for d, u in zip(ds, parts):
                _add(out, d, LoraPatch(down, u, scale))
    if misfits:
        raise LoraError(f"{path}: {len(misfits)} LoRA weights do not match this Flux model (e.g. {misfits[0]}); "
                        "is it a LoRA for another model (SDXL, SD3) or another Flux size?")
    return out


def lora_rank_info(parsed: FluxLora) -> dict:
    """Small summary for logs: targeted parameters, rank histogram, full deltas, skipped text-encoder keys."""
    ranks = Counter(p.down.shape[0] for p in parsed.values() if p.down is not None)
    return dict(format=getattr(parsed, "format", ""), weights=len(parsed), ranks=dict(sorted(ranks.items())),
                full_deltas=sum(p.down is None for p in parsed.values()),
                text_encoder_keys=getattr(parsed, "text_encoder_keys", 0))
