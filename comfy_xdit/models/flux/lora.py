"""Flux.1 LoRAs: Flux's target table and key schemes for the shared parser (models/lora.py).

BFL dotted names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``) and their kohya form
(``lora_unet_double_blocks_0_img_attn_qkv``) go through the checkpoint loader's BFL->diffusers table, so a LoRA
on a fused weight (qkv, linear1) is split by rows exactly like the weight it patches; diffusers/peft and
OneTrainer names patch the diffusers weights directly. Flux's own: XLabs processor LoRAs
(``double_blocks.0.processor.qkv_lora1.down.weight``), ComfyUI's ``linear1_qkv`` (the qkv rows of a single
block's linear1) and the hints that name the family a foreign file was made for.
"""

from __future__ import annotations

import re

from ..checkpoint import num_blocks
from ..lora import (LoraError, LoraFormat, LoraMerger, LoraPatch, ParsedLora, dense, lora_rank_info,  # noqa: F401
                    lora_targets, model_shapes, parse_lora)  # (re-exported)
from .checkpoint import _rules

FluxLora = ParsedLora  # the parsed-LoRA type, under the name Flux code has always used

_BFL_TOP = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
# XLabs processor LoRAs -> BFL modules; single-block qkv_lora patches only the qkv rows of linear1
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)"
                    r"\.(down|up)\.weight$")
_XLABS_MAP = {("double", "qkv", "1"): "img_attn.qkv", ("double", "qkv", "2"): "txt_attn.qkv",
              ("double", "proj", "1"): "img_attn.proj", ("double", "proj", "2"): "txt_attn.proj",
              ("single", "qkv", ""): "linear1_qkv", ("single", "proj", ""): "linear2"}
_FAMILY = ((("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("joint_blocks",), "SD3"), (("double_stream_modulation", "single_stream_modulation"), "Flux.2"))


def _xlabs_key(key):
    """(BFL module, down|up, 'xlabs') for an XLabs processor key, else None."""
    if m := _XLABS.match(key):
        kind, i, proj, n, d = m.groups()
        return f"{kind}_blocks.{i}.{_XLABS_MAP.get((kind, proj, n), 'unknown_xlabs')}", d, "xlabs"
    return None


FLUX_LORA = LoraFormat(
    label="Flux.1", model="Flux model", native=("bfl", _BFL_TOP), hints=_FAMILY,
    unknown_hint="is it a LoRA for another model (SDXL, SD3, Flux.2)?",
    misfit_hint="is it a LoRA for another model (SDXL, SD3) or another Flux size?", split_key=_xlabs_key)


def flux_lora_targets(shapes) -> dict:
    """LoRA module name (BFL or diffusers, dots or underscores) -> {'weight'|'bias': ([diffusers keys], op)}."""
    keys = list(shapes)
    rules = _rules(num_blocks(keys, "transformer_blocks."), num_blocks(keys, "single_transformer_blocks."),
                   "time_text_embed.guidance_embedder.linear_1.weight" in shapes)
    for i in range(num_blocks(keys, "single_transformer_blocks.")):  # ComfyUI's name for the qkv rows of linear1
        d = f"single_transformer_blocks.{i}.attn.to_"
        rules += [(f"single_blocks.{i}.linear1_qkv.{s}", [f"{d}{x}.{s}" for x in "qkv"], "split")
                  for s in ("weight", "bias")]
    return lora_targets(shapes, rules)


def load_flux_lora(path, model_state_shapes: dict) -> ParsedLora:
    """Parse a Flux LoRA file into {diffusers parameter name: LoraPatch}, checked against the model's shapes.

    Scale is alpha / rank (1.0 without an alpha, as ComfyUI does). Raises LoraError naming the file for
    unreadable files, keys that are not Flux transformer weights and LoRA shapes that do not fit."""
    return parse_lora(path, model_state_shapes, flux_lora_targets(model_state_shapes), FLUX_LORA)
