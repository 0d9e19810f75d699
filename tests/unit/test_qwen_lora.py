"""Qwen-Image LoRAs in every key style ComfyUI accepts for the model (comfy/lora.py, QwenImage: the
diffusion_model. names, transformer.<module>, lycoris_<module with underscores>, kohya lora_unet_*, the bare names
with .lora_A.default.weight, and .diff / .diff_b), parsed onto the diffusers weights and merged."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
from safetensors.torch import save_file

from comfy_xdit.models.lora import LoraError, LoraMerger, dense, model_shapes
from comfy_xdit.models.qwen import QWEN
from tests.qwen_tiny import make_tiny_qwen

# (module, out features, in features, rank, alpha) of the tiny model (width 512, text 64, 2 blocks)
MODULES = [("transformer_blocks.0.attn.to_q", 512, 512, 4, 2.0),
           ("transformer_blocks.1.attn.to_out.0", 512, 512, 8, None),
           ("transformer_blocks.0.attn.add_k_proj", 512, 512, 2, 8.0),
           ("transformer_blocks.0.attn.to_add_out", 512, 512, 4, None),
           ("transformer_blocks.1.img_mlp.net.0.proj", 2048, 512, 4, 1.0),
           ("transformer_blocks.1.txt_mod.1", 3072, 512, 2, None),
           ("img_in", 512, 64, 4, 4.0),
           ("txt_in", 512, 64, 2, None),
           ("norm_out.linear", 1024, 512, 4, 16.0),
           ("time_text_embed.timestep_embedder.linear_1", 512, 256, 2, None)]
# style: (module name as the file spells it, down suffix, up suffix)
STYLES = {
    "comfyui": (lambda m: f"diffusion_model.{m}", ".lora_A.weight", ".lora_B.weight"),  # and DiffSynth's
    "bare_default": (lambda m: m, ".lora_A.default.weight", ".lora_B.default.weight"),
    "diffusers": (lambda m: f"transformer.{m}", ".lora_A.weight", ".lora_B.weight"),
    "lycoris": (lambda m: "lycoris_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
}


@pytest.fixture(scope="module")
def base():
    return make_tiny_qwen(seed=1)


@pytest.fixture(scope="module")
def shapes(base):
    return model_shapes(base)


def _lora(style: str, modules=MODULES, seed=0) -> tuple[dict, dict]:
    """(file tensors, {parameter: (scale, up, down)})."""
    name, down_suffix, up_suffix = STYLES[style]
    g = torch.Generator().manual_seed(seed)
    sd, want = {}, {}
    for module, fan_out, fan_in, rank, alpha in modules:
        key = name(module)
        down, up = torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g)
        sd[key + down_suffix], sd[key + up_suffix] = down, up
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
        want[module + ".weight"] = ((alpha or rank) / rank, up, down)
    return sd, want


def _save(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, path)
    return path


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_reaches_the_weights_with_alpha_over_rank(tmp_path, shapes, style):
    sd, want = _lora(style)
    parsed = QWEN.load_lora(_save(tmp_path, style, sd), shapes)
    assert set(parsed) == set(want)
    for k, (scale, up, down) in want.items():
        p = parsed[k]
        assert p.scale == pytest.approx(scale) and torch.equal(p.up, up) and torch.equal(p.down, down), k
        assert torch.allclose(dense(p), scale * up @ down, atol=1e-5), k


def test_full_deltas(tmp_path, shapes):
    sd = {"diffusion_model.transformer_blocks.0.attn.norm_q.diff": torch.full((128,), 0.5),
          "diffusion_model.transformer_blocks.1.attn.to_q.diff_b": torch.full((512,), 0.25),
          "diffusion_model.img_in.diff": torch.arange(512 * 64.0).view(512, 64) / 1e4,
          "lora_unet_txt_norm.diff": torch.full((64,), -1.0)}
    parsed = QWEN.load_lora(_save(tmp_path, "diff", sd), shapes)
    want = {"transformer_blocks.0.attn.norm_q.weight": sd["diffusion_model.transformer_blocks.0.attn.norm_q.diff"],
            "transformer_blocks.1.attn.to_q.bias": sd["diffusion_model.transformer_blocks.1.attn.to_q.diff_b"],
            "img_in.weight": sd["diffusion_model.img_in.diff"], "txt_norm.weight": sd["lora_unet_txt_norm.diff"]}
    assert set(parsed) == set(want)
    for k, v in want.items():
        assert parsed[k].down is None and torch.equal(dense(parsed[k]), v), k


def test_merged_weight_is_w_plus_scaled_up_down(tmp_path):
    model = make_tiny_qwen(seed=1)
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    sd, want = _lora("kohya", seed=2)
    sd["diffusion_model.transformer_blocks.0.attn.to_q.diff_b"] = torch.full((512,), 0.25)
    lora = QWEN.load_lora(_save(tmp_path, "merge", sd), model_shapes(model))
    merger = LoraMerger(model)
    merger.set_loras([("a", lora, 0.7)])
    got = model.state_dict()
    for k, v in got.items():
        if k in want:
            scale, up, down = want[k]
            assert torch.allclose(v, orig[k] + 0.7 * scale * up @ down, atol=1e-5), k
        elif k == "transformer_blocks.0.attn.to_q.bias":
            assert torch.allclose(v, orig[k] + 0.7 * 0.25, atol=1e-6)
        else:
            assert torch.equal(v, orig[k]), k
    merger.set_loras([])
    assert all(torch.equal(v, orig[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_agrees_with_diffusers_converter(tmp_path, shapes, style):
    """diffusers' own Qwen-Image LoRA conversion (alpha folded into A / B) gives the same deltas."""
    sd, _ = _lora(style, seed=3)
    parsed = QWEN.load_lora(_save(tmp_path, style, sd), shapes)
    theirs = _convert_non_diffusers_qwen_lora_to_diffusers(dict(sd))
    assert {f"transformer.{k[:-len('.weight')]}.lora_A.weight" for k in parsed} == \
           {k for k in theirs if k.endswith(".lora_A.weight")}
    for k, p in parsed.items():
        m = f"transformer.{k[:-len('.weight')]}"
        assert torch.allclose(dense(p), theirs[m + ".lora_B.weight"] @ theirs[m + ".lora_A.weight"], atol=1e-5), k


@pytest.mark.parametrize("key,family", [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux.1"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "Flux.1"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
    ("transformer.blocks.0.attn2.to_k.lora_A.weight", "Wan"),
    ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "SD1.x/SDXL"),
])
def test_foreign_lora_is_named(tmp_path, shapes, key, family):
    up = key.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    path = _save(tmp_path, "foreign", {key: torch.zeros(4, 512), up: torch.zeros(512, 4)})
    with pytest.raises(LoraError, match=f"this looks like a LoRA for {family}, not Qwen-Image") as e:
        QWEN.load_lora(path, shapes)
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize("tensors,why", [
    ({"lora_A.weight": torch.zeros(4, 256), "lora_B.weight": torch.zeros(512, 4)}, "expects 256 inputs, model has 512"),
    ({"lora_A.weight": torch.zeros(4, 512), "lora_B.weight": torch.zeros(3072, 4)}, "has 3072 outputs, model has 512"),
    ({"diff": torch.zeros(512, 256)}, r"has shape \(512, 256\), model has \(512, 512\)"),
])
def test_shape_mismatch_is_refused(tmp_path, shapes, tensors, why):
    """E.g. a LoRA for the full-size model (width 3072) on another width."""
    sd = {f"diffusion_model.transformer_blocks.0.attn.to_q.{k}": v for k, v in tensors.items()}
    path = _save(tmp_path, "misfit", sd)
    with pytest.raises(LoraError, match=f"do not match this Qwen-Image model.*{why}.*another width") as e:
        QWEN.load_lora(path, shapes)
    assert str(e.value).startswith(str(path))
