"""PixArt LoRAs: the original PixArt names (``lora_unet_blocks_0_attn_qkv.lora_down.weight``,
``diffusion_model.blocks.0.cross_attn.kv_linear.lora_up.weight``) through the checkpoint loader's table, so a
LoRA on a fused qkv / kv_linear is split by rows exactly like the weight it patches; diffusers/peft names
(``transformer.transformer_blocks.0.attn1.to_q.lora_A.weight``, the style PixArt LoRAs are trained in) patch
the diffusers weights directly. Parsing, scales and shape checks are the shared parser's (models/lora.py)."""

from __future__ import annotations

from ..checkpoint import num_blocks
from ..lora import LoraFormat, ParsedLora, lora_targets, parse_lora
from .checkpoint import _rules

_TOP = ("blocks", "x_embedder", "t_embedder", "t_block", "y_embedder", "csize_embedder", "ar_embedder",
        "final_layer")
_FAMILY = ((("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn"), "Flux.1"),
           (("joint_blocks", "context_block", "x_block"), "SD3 / SD3.5"),
           (("self_attn", "ffn", "Wqkv"), "Wan or HunyuanDiT"))

PIXART_LORA = LoraFormat(
    label="PixArt", model="PixArt model", native=("pixart", _TOP), hints=_FAMILY,
    unknown_hint="is it a LoRA for another model (SD1.5, SDXL, HunyuanDiT)?",
    misfit_hint="is it a LoRA for another PixArt (α vs Σ) or another model of PixArt's width?")


def pixart_lora_targets(shapes) -> dict:
    """LoRA module name (original PixArt or diffusers, dots or underscores) -> {'weight'|'bias': ([diffusers
    keys], op)}."""
    return lora_targets(shapes, _rules(num_blocks(list(shapes), "transformer_blocks.")))


def load_pixart_lora(path, shapes: dict) -> ParsedLora:
    """Parse a PixArt LoRA file into {diffusers parameter name: LoraPatch}, checked against the whole model's
    parameter shapes (alpha / rank scales as ComfyUI applies them)."""
    return parse_lora(path, shapes, pixart_lora_targets(shapes), PIXART_LORA)
