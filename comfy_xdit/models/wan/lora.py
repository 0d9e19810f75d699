"""Wan LoRAs: the original Wan names (as ComfyUI, kohya, musubi-tuner and LightX2V's distillation LoRAs spell
them: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``diffusion_model.blocks.0.cross_attn.k.lora_A.weight``,
``.diff`` / ``.diff_b`` for norms and biases) through the checkpoint loader's renaming, which is diffusers' own
converter; diffusers/peft names (``transformer.blocks.0.attn1.to_q.lora_A.weight``) patch the diffusers weights
directly. Parsing, scales and shape checks are the shared parser's (models/lora.py)."""

from __future__ import annotations

from ..lora import LoraFormat, ParsedLora, lora_targets, parse_lora
from .checkpoint import original_from_diffusers

_TOP = ("blocks", "patch_embedding", "text_embedding", "time_embedding", "time_projection", "head", "img_emb")
_FAMILY = ((("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn"), "Flux.1"),
           (("joint_blocks", "context_block", "x_block"), "SD3 / SD3.5"))

WAN_LORA = LoraFormat(
    label="Wan", model="Wan model", native=("wan", _TOP), hints=_FAMILY,
    unknown_hint="is it a LoRA for another model (SDXL, Flux.1, HunyuanVideo)?",
    misfit_hint="is it a LoRA for another Wan size (1.3B vs 14B, T2V vs I2V, Wan 2.2 5B)?")


def wan_lora_targets(shapes) -> dict:
    """LoRA module name (original Wan or diffusers, dots or underscores) -> {'weight'|'bias': ([keys], op)}."""
    names = original_from_diffusers(dict.fromkeys(shapes))
    return lora_targets(shapes, [(orig, [diffusers], "copy") for orig, diffusers in
                                 zip(names, shapes)])


def load_wan_lora(path, shapes: dict) -> ParsedLora:
    """Parse a Wan LoRA file into {diffusers parameter name: LoraPatch}, checked against the whole model's
    parameter shapes (alpha / rank scales as ComfyUI applies them)."""
    return parse_lora(path, shapes, wan_lora_targets(shapes), WAN_LORA)
