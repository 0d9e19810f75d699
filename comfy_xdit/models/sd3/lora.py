"""SD3 / SD3.5 LoRAs: SD3's target table and hints for the shared parser (models/lora.py).

SAI names as ComfyUI spells them for SD3 (``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``,
``diffusion_model.joint_blocks.0.context_block.attn.proj.lora_up.weight``) go through the checkpoint loader's
SAI->diffusers table: a LoRA on a fused qkv is split into to_q/to_k/to_v (add_*_proj for the text stream,
attn2 in SD3.5 Medium's dual-attention blocks) by rows, and one on the last block's text adaLN or on the final
layer's adaLN has its shift/scale halves exchanged like the weight. diffusers/peft
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, ``base_model.model.``), OneTrainer
(``lora_transformer_*``) and SimpleTuner (``lycoris_*``) names patch the diffusers weights directly.
"""

from __future__ import annotations

from ..checkpoint import num_blocks
from ..lora import LoraFormat, ParsedLora, lora_targets, parse_lora
from .checkpoint import _SHAPE_KEYS, _rules

_OPS = {"copy": "copy", "qkv": "split", "swap": "swap"}  # the checkpoint table's ops as the LoRA parser names them
_SAI_TOP = ("joint_blocks", "x_embedder", "t_embedder", "y_embedder", "final_layer")
_FAMILY = ((("input_blocks", "middle_block", "output_blocks", "down_blocks", "up_blocks", "mid_block"), "SD1.x/SDXL"),
           (("double_stream_modulation", "single_stream_modulation"), "Flux.2"),
           (("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn"), "Flux.1"))

SD3_LORA = LoraFormat(
    label="SD3 / SD3.5", model="SD3 model", native=("sai", _SAI_TOP), hints=_FAMILY,
    unknown_hint="is it a LoRA for another model (SDXL, Flux.1, Flux.2)?",
    misfit_hint="is it a LoRA for another model (SDXL, Flux.1) or another SD3 / SD3.5 size?")


def _config(shapes) -> dict:
    """What the SAI table depends on, from the diffusers parameter names: block count, q/k norm, attn2 blocks."""
    names = _SHAPE_KEYS["diffusers"]
    return dict(num_layers=num_blocks(shapes, "transformer_blocks."),
                qk_norm="rms_norm" if any(names["qn"].match(k) for k in shapes) else None,
                dual_attention_layers=tuple(sorted({int(m.group(1)) for k in shapes
                                                    if (m := names["attn2"].match(k))})))


def sd3_lora_targets(shapes) -> dict:
    """LoRA module name (SAI or diffusers, dots or underscores) -> {'weight'|'bias': ([diffusers keys], op)}."""
    return lora_targets(shapes, [(sai, ds, _OPS[op]) for sai, ds, op in _rules(_config(shapes))])


def load_sd3_lora(path, shapes: dict) -> ParsedLora:
    """Parse an SD3 / SD3.5 LoRA file into {diffusers parameter name: LoraPatch}, checked against the whole
    model's parameter shapes. Scale is alpha / rank (1.0 without an alpha, as ComfyUI does). Raises LoraError
    naming the file for unreadable files, keys that are not SD3 transformer weights (saying which family the
    file looks made for) and LoRA shapes that do not fit."""
    return parse_lora(path, shapes, sd3_lora_targets(shapes), SD3_LORA)
