"""Qwen-Image LoRAs. Qwen-Image's own names are diffusers' (``transformer_blocks.0.attn.to_q``), so every style
ComfyUI accepts for it patches the weights directly: ``diffusion_model.<module>.lora_A/B`` (ComfyUI's and
DiffSynth's), ``transformer.<module>`` (diffusers / peft), kohya's ``lora_unet_<module with underscores>``
(``lora_down/up`` + ``alpha``) and SimpleTuner's ``lycoris_*``; ``.diff`` / ``.diff_b`` full deltas too. Parsing,
scales and shape checks are the shared parser's (models/lora.py)."""

from __future__ import annotations

from ..lora import LoraFormat, ParsedLora, lora_targets, parse_lora

_TOP = ("transformer_blocks", "img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out")
_FAMILY = ((("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn"), "Flux.1"),
           (("joint_blocks", "context_block", "x_block"), "SD3 / SD3.5"),
           (("self_attn", "cross_attn", "attn1", "attn2"), "Wan"))

QWEN_LORA = LoraFormat(
    label="Qwen-Image", model="Qwen-Image model", native=("qwen", _TOP), hints=_FAMILY,
    unknown_hint="is it a LoRA for another model (SDXL, Flux.1, Wan)?",
    misfit_hint="is it a LoRA for another model of another width?")


def load_qwen_lora(path, shapes: dict) -> ParsedLora:
    """Parse a Qwen-Image LoRA file into {parameter name: LoraPatch}, checked against the whole model's parameter
    shapes (alpha / rank scales as ComfyUI applies them)."""
    return parse_lora(path, shapes, lora_targets(shapes), QWEN_LORA)
