"""SD3 / SD3.5 LoRAs through the shared parser: kohya SAI names (fused qkv split, adaLN halves swapped),
diffusers/peft names and full-delta .diff files merge like a hand merge; Flux LoRAs and misfits are refused."""

import copy
import os
import pickle

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from comfy_xdit.models.flux.lora import load_flux_lora
from comfy_xdit.models.lora import LoraError, LoraMerger, lora_rank_info, model_shapes
from comfy_xdit.models.sd3 import SD3
from comfy_xdit.models.sd3.checkpoint import sai_from_diffusers
from comfy_xdit.models.sd3.lora import load_sd3_lora
from tests.flux_tiny import make_tiny_flux
from comfy_xdit.models.sd3.random import sd3_config
from tests.sd3_tiny import TINY_PRESETS, make_tiny_sd3, run_sd3, sd3_inputs

W = 256  # tiny width: 4 heads of 64; fused qkv has 3 * 256 rows, the MLP 1024


@pytest.fixture(scope="module", params=TINY_PRESETS)
def base(request):
    return request.param, make_tiny_sd3(request.param, seed=0)


def _shapes(preset):
    """As the worker checks a LoRA: the whole model's shapes, off a meta-built copy."""
    return model_shapes(SD3.meta_model(sd3_config(preset)))


# SAI module -> ([diffusers modules], op), written out by hand for the modules these tests patch; the test
# against diffusers' converter below checks this table too
def _sai_map(n: int) -> dict:
    last = n - 1
    m = {"final_layer.adaLN_modulation.1": (["norm_out.linear"], "swap"), "x_embedder.proj": (["pos_embed.proj"], "copy"),
         f"joint_blocks.{last}.context_block.adaLN_modulation.1": ([f"transformer_blocks.{last}.norm1_context.linear"], "swap")}
    for i in range(n):
        b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        m[b + "x_block.attn.qkv"] = ([f"{d}attn.to_{x}" for x in "qkv"], "split")
        m[b + "context_block.attn.qkv"] = ([f"{d}attn.add_{x}_proj" for x in "qkv"], "split")
        m[b + "x_block.attn2.qkv"] = ([f"{d}attn2.to_{x}" for x in "qkv"], "split")
        m[b + "x_block.attn2.proj"] = ([f"{d}attn2.to_out.0"], "copy")
        m[b + "x_block.attn.proj"] = ([f"{d}attn.to_out.0"], "copy")
        m[b + "context_block.attn.proj"] = ([f"{d}attn.to_add_out"], "copy")
        m[b + "x_block.mlp.fc2"] = ([f"{d}ff.net.2"], "copy")
        m[b + "x_block.attn.ln_q"] = ([f"{d}attn.norm_q"], "copy")
    return m


def _pair(g, out, inn, rank, dtype=torch.float32):
    """(down, up) as stored and their fp32 product; magnitudes make the delta comparable to the weights."""
    down = (torch.randn(rank, inn, generator=g) * 0.2).to(dtype)
    up = (torch.randn(out, rank, generator=g) * 0.2).to(dtype)
    return down, up, up.float() @ down.float()


# Each builder returns (file dict, deltas on SAI tensor names, deltas on diffusers tensor names) at strength 1.
def _kohya(preset, sai, n, g):
    """kohya-style SAI names in bf16 (as kohya files usually are), alphas on some, a text-encoder key."""
    mods = {"joint_blocks.0.x_block.attn.qkv": (4, 2.0), "joint_blocks.0.context_block.attn.proj": (2, None),
            f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1": (2, 1.0),
            "final_layer.adaLN_modulation.1": (4, 8.0), "joint_blocks.1.x_block.mlp.fc2": (4, None)}
    if preset == "tiny-sd3.5-medium":
        mods["joint_blocks.0.x_block.attn2.qkv"] = (4, 8.0)
    sd, sdai = {}, {}
    for mod, (rank, alpha) in mods.items():
        down, up, d = _pair(g, *sai[mod + ".weight"].shape, rank, torch.bfloat16)
        name = "lora_unet_" + mod.replace(".", "_")
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
        sdai[mod + ".weight"] = d * (1.0 if alpha is None else alpha / rank)  # no alpha: ComfyUI's scale 1
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd.update({te + ".lora_down.weight": torch.zeros(4, 768), te + ".lora_up.weight": torch.zeros(768, 4),
               te + ".alpha": torch.tensor(4.0)})
    return sd, sdai, {}


def _peft(preset, sd_model, n, g):
    """diffusers/peft names (transformer., base_model.model., .lora.down), one OneTrainer name, a text-encoder key."""
    peft, dots, kohya = (".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"), \
        (".lora_down.weight", ".lora_up.weight")
    mods = {"transformer.transformer_blocks.0.attn.to_q": ("transformer_blocks.0.attn.to_q", 4, *peft),
            "transformer.transformer_blocks.0.attn.add_k_proj": ("transformer_blocks.0.attn.add_k_proj", 2, *dots),
            "base_model.model.transformer_blocks.1.ff.net.0.proj": ("transformer_blocks.1.ff.net.0.proj", 4, *peft),
            "lora_transformer_transformer_blocks_1_attn_to_out_0": ("transformer_blocks.1.attn.to_out.0", 2, *kohya),
            "transformer.norm_out.linear": ("norm_out.linear", 4, *peft)}  # diffusers' order: no swap
    if preset == "tiny-sd3.5-medium":
        mods["transformer.transformer_blocks.1.attn2.to_v"] = ("transformer_blocks.1.attn2.to_v", 2, *peft)
    sd, dd = {}, {}
    for mod, (key, rank, a, b) in mods.items():
        down, up, d = _pair(g, *sd_model[key + ".weight"].shape, rank)
        sd[mod + a], sd[mod + b] = down, up
        dd[key + ".weight"] = d
    sd["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(2.0)
    dd["transformer_blocks.0.attn.to_q.weight"] = dd["transformer_blocks.0.attn.to_q.weight"] * 0.5
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 768)
    return sd, {}, dd


def _diff(preset, sai, n, g):
    """Full deltas under diffusion_model.: fused qkv weight and bias, swapped bias, a conv, an MLP, a norm."""
    keys = ["joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn.qkv.bias",
            "final_layer.adaLN_modulation.1.bias", f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1.weight",
            "x_embedder.proj.weight", "joint_blocks.1.x_block.mlp.fc2.weight"]
    if preset != "tiny-sd3-medium":
        keys.append("joint_blocks.0.x_block.attn.ln_q.weight")
    if preset == "tiny-sd3.5-medium":
        keys.append("joint_blocks.1.x_block.attn2.proj.bias")
    sd, sdai = {}, {}
    for k in keys:
        mod, s = k.rsplit(".", 1)
        sd[f"diffusion_model.{mod}.{'diff' if s == 'weight' else 'diff_b'}"] = sdai[k] = \
            torch.randn(sai[k].shape, generator=g) * 0.05
    return sd, sdai, {}


BUILDERS = {"kohya": _kohya, "diffusers": _peft, "diff": _diff}
FORMATS = {"kohya": "kohya", "diffusers": "diffusers+onetrainer", "diff": "sai"}


def _make(tmp_path, base, fmt, seed=1):
    preset, model = base
    sd_model = model.state_dict()
    src = sd_model if fmt == "diffusers" else sai_from_diffusers(sd_model)
    sd, sdai, dd = BUILDERS[fmt](preset, src, model.config.num_layers, torch.Generator().manual_seed(seed))
    path = tmp_path / f"{preset}-{fmt}-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, (sdai, dd)


def _expected(model, *weighted):
    """Hand merge on the diffusers weights: each SAI delta goes to the tensors _sai_map names, fused qkv rows
    split in three, shift/scale halves exchanged for 'swap'. ``weighted``: ((SAI deltas, diffusers deltas), strength)."""
    want = {k: v.clone() for k, v in model.state_dict().items()}
    table = _sai_map(model.config.num_layers)
    for (sdai, dd), s in weighted:
        for k, d in sdai.items():
            mod, suffix = k.rsplit(".", 1)
            ds, op = table[mod]
            parts = d.chunk(3) if op == "split" else [torch.cat(d.chunk(2)[::-1])] if op == "swap" else [d]
            for t, p in zip(ds, parts, strict=True):
                want[f"{t}.{suffix}"] += s * p
        for k, d in dd.items():
            want[k] += s * d
    return want


def _assert_state(model, want, exact=False, atol=1e-6):
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if exact or torch.equal(got[k], want[k]):
            assert torch.equal(got[k], want[k]), k
        else:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            err = (got[k] - want[k]).abs().max().item()
            assert err <= atol, f"{k}: max abs error {err:.3g} > {atol}"


def _lora_id(path):
    return os.path.abspath(path), os.path.getmtime(path)


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_format_merges_like_hand_merge(tmp_path, base, fmt):
    path, deltas = _make(tmp_path, base, fmt)
    preset, model0 = base
    lora = SD3.load_lora(path, _shapes(preset))  # the family seam, as the worker calls it
    info = lora_rank_info(lora)
    assert lora.path == str(path) and info["format"] == FORMATS[fmt] and info["weights"] == len(lora) > 0
    assert info["text_encoder_keys"] == {"kohya": 3, "diffusers": 1}.get(fmt, 0)
    model, lid = copy.deepcopy(model0), _lora_id(path)
    merger = LoraMerger(model)
    merger.set_loras([(lid, lora, 0.0)])
    _assert_state(model, model0.state_dict(), exact=True)
    merger.set_loras([(lid, lora, 1.0)])
    want = _expected(model0, (deltas, 1.0))
    _assert_state(model, want)
    touched = {k for k in want if not torch.equal(want[k], model0.state_dict()[k])}
    assert touched == set(lora) and touched
    merger.set_loras([(lid, lora, -0.5)])
    _assert_state(model, _expected(model0, (deltas, -0.5)))
    merger.set_loras([(lid, lora, 0.0)])  # strength 0 restores the base bit for bit
    _assert_state(model, model0.state_dict(), exact=True)
    merger.set_loras([(lid, pickle.loads(pickle.dumps(lora)), 1.0)])  # workers receive it pickled
    _assert_state(model, want)
    merger.set_loras([])
    _assert_state(model, model0.state_dict(), exact=True)
    assert merger.current() == [] and not merger._backup


def test_hand_merge_agrees_with_diffusers_converter(tmp_path, base):
    """Independent oracle for the SAI ops: add the deltas to the SAI state dict, convert it with diffusers'
    SD3 converter, compare with the merged model (both SAI-named files at once, two strengths)."""
    preset, model0 = base
    (pk, dk), (pd, dd) = (_make(tmp_path, base, f, seed=3) for f in ("kohya", "diff"))
    sai = sai_from_diffusers({k: v.clone() for k, v in model0.state_dict().items()})
    for (sdai, _), s in ((dk, 0.7), (dd, -1.3)):
        for k, d in sdai.items():
            sai[k] = sai[k] + s * d
    want = convert_sd3_transformer_checkpoint_to_diffusers(sai)
    shapes = _shapes(preset)
    model = copy.deepcopy(model0)
    LoraMerger(model).set_loras([(_lora_id(pk), load_sd3_lora(pk, shapes), 0.7),
                                 (_lora_id(pd), load_sd3_lora(pd, shapes), -1.3)])
    _assert_state(model, want)
    _assert_state(model, _expected(model0, (dk, 0.7), (dd, -1.3)))


def test_merged_forward_matches_reference(tmp_path, base):
    preset, model0 = base
    path, deltas = _make(tmp_path, base, "kohya")
    model = copy.deepcopy(model0)
    LoraMerger(model).set_loras([(_lora_id(path), load_sd3_lora(path, model_shapes(model0)), 1.0)])
    ref = copy.deepcopy(model0)
    ref.load_state_dict(_expected(model0, (deltas, 1.0)))
    x = sd3_inputs(sd3_config(preset))
    out = run_sd3(model, x)
    torch.testing.assert_close(out, run_sd3(ref, x), rtol=0, atol=1e-5)
    assert (out - run_sd3(model0, x)).abs().max() > 1e-2  # the LoRA changed the output


# ---- bad files: always LoraError, always naming the file

def _error(path, shapes, *needles, load=load_sd3_lora):
    with pytest.raises(LoraError) as exc:
        load(path, shapes)
    msg = str(exc.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def medium():
    return make_tiny_sd3("tiny-sd3-medium")


def _flux_lora(tmp_path, style):
    flux = make_tiny_flux(seed=0)
    path = tmp_path / f"flux-{style}.safetensors"
    if style == "kohya":
        n = "lora_unet_double_blocks_0_img_attn_qkv"
        sd = {n + ".lora_down.weight": torch.zeros(4, 128), n + ".lora_up.weight": torch.zeros(384, 4),
              n + ".alpha": torch.tensor(4.0), "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 640),
              "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(128, 4)}
    elif style == "diffusers":  # transformer_blocks.* names exist in SD3 too; the single blocks do not
        sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4),
              "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(4, 128),
              "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(512, 4)}
    else:  # XLabs
        sd = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(4, 128),
              "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(384, 4)}
    save_file(sd, str(path))
    load_flux_lora(path, model_shapes(flux))  # a valid Flux LoRA
    return path


@pytest.mark.parametrize("style", ["kohya", "diffusers", "xlabs"])
def test_flux_lora_is_rejected(tmp_path, medium, style):
    path = _flux_lora(tmp_path, style)
    _error(path, model_shapes(medium), "keys are not LoRA weights for this SD3 / SD3.5 transformer",
           "this looks like a LoRA for Flux.1, not SD3 / SD3.5")


def test_sd3_lora_given_to_flux_parser_names_sd3(tmp_path, base):
    path, _ = _make(tmp_path, base, "kohya")
    _error(path, model_shapes(make_tiny_flux(seed=0)), "not LoRA weights for this Flux.1 transformer",
           "this looks like a LoRA for SD3, not Flux.1", load=load_flux_lora)


def test_mismatched_ranks_name_the_key(tmp_path, medium):
    path = tmp_path / "big.safetensors"
    n = "lora_unet_joint_blocks_0_x_block_attn_qkv"  # for full-size SD3 Medium (width 1536)
    save_file({n + ".lora_down.weight": torch.zeros(4, 1536), n + ".lora_up.weight": torch.zeros(4608, 4)}, str(path))
    _error(path, model_shapes(medium), "1 LoRA weights do not match this SD3 model",
           f"'{n}' expects 1536 inputs, model has 256", "another SD3 / SD3.5 size")
    cases = [("transformer.transformer_blocks.0.attn.to_q", (4, W), (300, 4), "has 300 outputs, model has 256"),
             ("lora_unet_joint_blocks_1_context_block_attn_qkv", (4, W), (3 * W, 8), "has inconsistent down/up shapes"),
             ("lora_unet_joint_blocks_2_context_block_adaLN_modulation_1", (2, W), (4 * W, 2),
              f"has {4 * W} outputs, model has {2 * W}")]  # the last block's text adaLN: shift and scale only
    for name, down, up, needle in cases:
        a, b = (".lora_A.weight", ".lora_B.weight") if name.startswith("transformer.") else (".lora_down.weight",
                                                                                               ".lora_up.weight")
        save_file({name + a: torch.zeros(down), name + b: torch.zeros(up)}, str(path))
        _error(path, model_shapes(medium), f"'{name}' {needle}")
    save_file({"diffusion_model.joint_blocks.0.x_block.attn.qkv.diff": torch.zeros(3 * W, 64)}, str(path))
    _error(path, model_shapes(medium), "'diffusion_model.joint_blocks.0.x_block.attn.qkv' has shape (768, 64), "
                                       "model has (768, 256)")


@pytest.mark.parametrize("sd,needle", [
    ({"lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight": torch.zeros(4, W),  # no attn2 in SD3 Medium
      "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight": torch.zeros(3 * W, 4)}, "not LoRA weights"),
    ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, W),
      "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(W, 4)}, "another model (SDXL, Flux.1"),
    ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640)},
     "this looks like a LoRA for SD1.x/SDXL, not SD3 / SD3.5"),
    ({"lora_unet_joint_blocks_2_context_block_attn_proj.lora_down.weight": torch.zeros(4, W),  # last block: none
      "lora_unet_joint_blocks_2_context_block_attn_proj.lora_up.weight": torch.zeros(W, 4)}, "not LoRA weights"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * W, 4)}, "only a up weight"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.dora_scale": torch.zeros(3 * W, 1)}, "not supported"),
    ({}, "no LoRA weights"),
])
def test_other_bad_files(tmp_path, medium, sd, needle):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    _error(path, model_shapes(medium), needle)


def test_unreadable_and_text_encoder_only(tmp_path, medium):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file" * 20)
    _error(path, model_shapes(medium), "not a readable")
    te = tmp_path / "te.safetensors"
    save_file({"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 64)}, str(te))
    lora = load_sd3_lora(te, model_shapes(medium))
    assert len(lora) == 0 and lora.text_encoder_keys == 1
