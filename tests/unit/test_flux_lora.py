"""Flux LoRAs: kohya/ComfyUI, diffusers/peft and XLabs files, in-place merging, strength changes, bad files."""

import copy
import inspect

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.models.flux.checkpoint import bfl_to_diffusers, diffusers_to_bfl, load_flux_transformer
from comfy_xdit.models.flux.lora import load_flux_lora, lora_rank_info
from comfy_xdit.models.lora import LoraError, LoraMerger, LoraPatch, model_shapes
from tests.flux_tiny import make_tiny_flux, tiny_flux_config, write_flux_checkpoint

CFG = tiny_flux_config()
W = 128  # tiny width: linear1 has 3*128 + 512 rows, linear2 has 128 + 512 inputs


@pytest.fixture(scope="module")
def base():
    return make_tiny_flux(seed=0)


def _inputs(seed=123):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 24, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]), img_ids=torch.randint(0, 8, (24, 3), generator=g).float(),
                txt_ids=torch.zeros(7, 3), return_dict=False)


def _pair(g, out, inn, rank, dtype=torch.float32):
    """(down, up) as stored and their fp32 values; magnitudes make the delta comparable to the weights."""
    down, up = (torch.randn(rank, inn, generator=g) * 0.2).to(dtype), (torch.randn(out, rank, generator=g) * 0.2).to(dtype)
    return down, up, up.float() @ down.float()


# Each builder returns (file dict, deltas on BFL keys, deltas on diffusers keys), deltas at strength 1.
KOHYA = {"double_blocks.0.img_attn.qkv": 4, "double_blocks.1.txt_attn.qkv": 8, "double_blocks.0.img_attn.proj": 4,
         "double_blocks.1.txt_attn.proj": 2, "double_blocks.0.img_mlp.0": 4, "double_blocks.1.img_mlp.2": 4,
         "double_blocks.0.txt_mlp.0": 2, "double_blocks.0.img_mod.lin": 2, "double_blocks.1.txt_mod.lin": 4,
         "single_blocks.0.linear1": 8, "single_blocks.1.linear1": 4, "single_blocks.0.linear2": 4,
         "single_blocks.1.modulation.lin": 2, "final_layer.adaLN_modulation.1": 4, "final_layer.linear": 2,
         "img_in": 2, "guidance_in.in_layer": 2}


def _kohya(bfl, g):
    sd, bd = {}, {}
    for i, (mod, rank) in enumerate(KOHYA.items()):
        down, up, d = _pair(g, *bfl[mod + ".weight"].shape, rank, torch.bfloat16)  # kohya files are usually bf16
        name = "lora_unet_" + mod.replace(".", "_")
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
        scale = 1.0  # no alpha: ComfyUI's scale 1
        if i % 3:
            alpha = float(rank * (i % 3)) / 2
            sd[name + ".alpha"], scale = torch.tensor(alpha, dtype=torch.bfloat16), alpha / rank
        bd[mod + ".weight"] = d * scale
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd.update({te + ".lora_down.weight": torch.zeros(4, 768), te + ".lora_up.weight": torch.zeros(768, 4),
               te + ".alpha": torch.tensor(4.0)})
    return sd, bd, {}


def _comfy(bfl, g):
    """BFL names under diffusion_model., with full-delta .diff/.diff_b patches on fused, swapped and norm tensors."""
    down, up, d = _pair(g, *bfl["double_blocks.1.img_attn.qkv.weight"].shape, 4)
    p = "diffusion_model."
    sd = {p + "double_blocks.1.img_attn.qkv.lora_down.weight": down, p + "double_blocks.1.img_attn.qkv.lora_up.weight": up,
          p + "double_blocks.1.img_attn.qkv.alpha": torch.tensor(8.0)}
    bd = {"double_blocks.1.img_attn.qkv.weight": d * 2}
    for key, mod, suffix in (("single_blocks.0.linear1.bias", "single_blocks.0.linear1", ".diff_b"),
                             ("single_blocks.1.linear1.weight", "single_blocks.1.linear1", ".diff"),
                             ("final_layer.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1", ".diff_b"),
                             ("double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.norm.query_norm.scale", ".diff")):
        sd[p + mod + suffix] = bd[key] = torch.randn(bfl[key].shape, generator=g) * 0.05
    return sd, bd, {}


def _diffusers(sd_model, g):
    sd, dd = {}, {}
    mods = {"transformer.transformer_blocks.0.attn.to_q": 4, "transformer.transformer_blocks.0.attn.add_k_proj": 4,
            "transformer.transformer_blocks.1.ff.net.0.proj": 8, "transformer.single_transformer_blocks.0.attn.to_v": 4,
            "base_model.model.single_transformer_blocks.1.proj_mlp": 2, "transformer.norm_out.linear": 4,
            "transformer.single_transformer_blocks.1.proj_out": 4}
    for i, (mod, rank) in enumerate(mods.items()):
        key = mod.split(".", 2)[-1] if mod.startswith("base_model") else mod.removeprefix("transformer.")
        down, up, d = _pair(g, *sd_model[key + ".weight"].shape, rank)
        a, b = (".lora.down.weight", ".lora.up.weight") if i == 2 else (".lora_A.weight", ".lora_B.weight")
        sd[mod + a], sd[mod + b] = down, up
        dd[key + ".weight"] = d
    sd["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(2.0)
    dd["transformer_blocks.0.attn.to_q.weight"] = dd["transformer_blocks.0.attn.to_q.weight"] * 0.5
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 768)
    return sd, {}, dd


def _xlabs(bfl, g):
    sd, bd = {}, {}
    for i in range(2):
        for lora, mod in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                          ("proj_lora2", "txt_attn.proj")):
            down, up, bd[f"double_blocks.{i}.{mod}.weight"] = _pair(g, *bfl[f"double_blocks.{i}.{mod}.weight"].shape, 4)
            sd[f"double_blocks.{i}.processor.{lora}.down.weight"], sd[f"double_blocks.{i}.processor.{lora}.up.weight"] = down, up
        down, up, d = _pair(g, 3 * W, W, 4)  # qkv_lora patches only the qkv rows of linear1, not the MLP rows
        sd[f"single_blocks.{i}.processor.qkv_lora.down.weight"], sd[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = down, up
        bd[f"single_blocks.{i}.linear1.weight"] = torch.cat([d, torch.zeros(4 * W, W)])
        down, up, bd[f"single_blocks.{i}.linear2.weight"] = _pair(g, W, 5 * W, 4)
        sd[f"single_blocks.{i}.processor.proj_lora.down.weight"], sd[f"single_blocks.{i}.processor.proj_lora.up.weight"] = down, up
    return sd, bd, {}


BUILDERS = {"kohya": _kohya, "bfl": _comfy, "diffusers": _diffusers, "xlabs": _xlabs}


def _make(tmp_path, base, fmt, seed=1):
    sd_model = base.state_dict()
    src = sd_model if fmt == "diffusers" else diffusers_to_bfl(sd_model)
    sd, bd, dd = BUILDERS[fmt](src, torch.Generator().manual_seed(seed))
    path = tmp_path / f"{fmt}_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path, (bd, dd)


def _expected(base, *weighted):
    """Hand merge, independent of the merger: add BFL deltas on the fused BFL state dict, split it with the
    checkpoint loader's mapping, then add diffusers deltas. ``weighted``: ((bfl deltas, diffusers deltas), strength)."""
    bfl = {k: v.clone() for k, v in diffusers_to_bfl(base.state_dict()).items()}
    for (bd, _), s in weighted:
        for k, d in bd.items():
            bfl[k] += s * d
    sd = bfl_to_diffusers(bfl, CFG)
    for (_, dd), s in weighted:
        for k, d in dd.items():
            sd[k] = sd[k] + s * d
    return sd


def _assert_state(model, want, exact=False):
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if exact:
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=k)


def _forward(model):
    with torch.no_grad():
        return model(**_inputs())[0]


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_format_merges_like_hand_merge(tmp_path, base, fmt):
    path, deltas = _make(tmp_path, base, fmt)
    lora = load_flux_lora(path, model_shapes(base))
    info = lora_rank_info(lora)
    assert lora.path == str(path) and info["format"] == fmt and info["weights"] == len(lora) > 0
    assert info["text_encoder_keys"] == {"kohya": 3, "diffusers": 1}.get(fmt, 0)
    model = copy.deepcopy(base)
    merger = LoraMerger(model)
    merger.set_loras([("a", lora, 0.0)])
    _assert_state(model, base.state_dict(), exact=True)
    merger.set_loras([("a", lora, 1.0)])
    want = _expected(base, (deltas, 1.0))
    _assert_state(model, want)
    touched = {k for k in want if not torch.equal(want[k], base.state_dict()[k])}
    assert touched == set(lora) and touched
    ref = copy.deepcopy(base)
    ref.load_state_dict(want)
    out = _forward(model)
    torch.testing.assert_close(out, _forward(ref), rtol=0, atol=1e-5)
    assert (out - _forward(base)).abs().max() > 1e-2  # the LoRA changed the output
    at_one = {k: v.clone() for k, v in model.state_dict().items()}
    for s in (0.5, 0.0, 1.0, -0.25, 1.0):  # every state equals a fresh merge bit for bit: nothing drifts
        merger.set_loras([("a", lora, s)])
        fresh = copy.deepcopy(base)
        LoraMerger(fresh).set_loras([("a", lora, s)])
        _assert_state(model, fresh.state_dict(), exact=True)
        _assert_state(model, _expected(base, (deltas, s)))
    _assert_state(model, at_one, exact=True)
    merger.set_loras([])
    _assert_state(model, base.state_dict(), exact=True)
    assert merger.current() == [] and not merger._backup


def test_stacked_loras_and_removal(tmp_path, base):
    (pk, dk), (pd, dd), (px, dx) = (_make(tmp_path, base, f, seed=i) for i, f in enumerate(("kohya", "diffusers", "xlabs")))
    shapes = model_shapes(base)
    k, d, x = (load_flux_lora(p, shapes) for p in (pk, pd, px))
    model = copy.deepcopy(base)
    merger = LoraMerger(model)
    merger.set_loras([("k", k, 0.7), ("d", d, -0.3), ("x", x, 1.2)])
    _assert_state(model, _expected(base, (dk, 0.7), (dd, -0.3), (dx, 1.2)))
    assert [(i, s) for i, _, s in merger.current()] == [("k", 0.7), ("d", -0.3), ("x", 1.2)]
    merger.set_loras([("d", d, -0.3)])
    fresh = copy.deepcopy(base)
    LoraMerger(fresh).set_loras([("d", d, -0.3)])
    _assert_state(model, fresh.state_dict(), exact=True)
    assert set(merger._backup) == set(d)  # backups only for weights that are modified now
    merger.set_loras([("k", k, 1.0), ("k2", k, 1.0)])  # the same LoRA twice adds up
    _assert_state(model, _expected(base, (dk, 2.0)))
    merger.set_loras([])
    _assert_state(model, base.state_dict(), exact=True)


def test_unchanged_set_is_a_noop(tmp_path, base):
    path, _ = _make(tmp_path, base, "diffusers")
    lora = load_flux_lora(path, model_shapes(base))
    model = copy.deepcopy(base)
    merger = LoraMerger(model)
    merger.set_loras([("a", lora, 1.0)])
    w = model.transformer_blocks[0].attn.to_q.weight
    with torch.no_grad():
        w.add_(1.0)  # a marker: survives only if the second call writes nothing
    marked = w.detach().clone()
    merger.set_loras([("a", lora, 1.0)])
    assert torch.equal(w, marked)
    merger.set_loras([("a", lora, 0.0)])  # a real change rebuilds from the backup, dropping the marker
    _assert_state(model, base.state_dict(), exact=True)


def test_fused_views_from_bfl_checkpoint(tmp_path, base):
    model, _ = load_flux_transformer(write_flux_checkpoint(base, tmp_path / "flux.safetensors"), dtype=torch.float32)
    attn = model.single_transformer_blocks[0].attn
    ptr = attn.to_q.weight.untyped_storage().data_ptr()
    fused = attn.to_q.weight.untyped_storage()
    if attn.to_k.weight.untyped_storage().data_ptr() != ptr:
        pytest.skip("the loader no longer returns views of the fused tensor")
    path, deltas = _make(tmp_path, base, "kohya")
    merger = LoraMerger(model)
    merger.set_loras([("k", load_flux_lora(path, model_shapes(model)), 1.0)])
    _assert_state(model, _expected(base, (deltas, 1.0)))
    proj_mlp = model.single_transformer_blocks[0].proj_mlp.weight
    assert attn.to_q.weight.untyped_storage().data_ptr() == ptr and proj_mlp.untyped_storage().data_ptr() == ptr
    # the fused storage itself holds the merged rows: q, k, v, mlp back to back
    flat = torch.empty(0).set_(fused).view(-1)[:(3 * W + 4 * W) * W].view(-1, W)
    assert torch.equal(flat[:W], attn.to_q.weight) and torch.equal(flat[3 * W:], proj_mlp)
    merger.set_loras([])
    _assert_state(model, base.state_dict(), exact=True)


def test_bf16_model_merges_in_fp32_without_drift(tmp_path, base):
    path, deltas = _make(tmp_path, base, "kohya")
    b16 = torch.nn.Module.to(copy.deepcopy(base), torch.bfloat16)
    lora = load_flux_lora(path, model_shapes(b16))
    model = copy.deepcopy(b16)
    merger = LoraMerger(model)
    merger.set_loras([("k", lora, 1.0)])
    got, want = model.state_dict(), _expected(b16, (deltas, 1.0))  # fp32 sum of bf16 base and delta
    for k in want:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].float(), want[k].float().bfloat16().float(), rtol=0.01, atol=1e-3)
    first = {k: v.clone() for k, v in got.items()}
    for s in (0.3, 0.0, 1.0):
        merger.set_loras([("k", lora, s)])
    _assert_state(model, first, exact=True)
    merger.set_loras([("k", lora, 0.0)])
    _assert_state(model, b16.state_dict(), exact=True)


def _dense(p: LoraPatch):
    return p.up.float() * p.scale if p.down is None else p.scale * (p.up.float() @ p.down.float())


def _compare_with_diffusers(ours, theirs):
    """Deltas per diffusers weight from diffusers' own converter output (lora_A/lora_B, scales folded in)."""
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items() if not k.startswith("text_encoder")}
    mods = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert {m + ".weight" for m in mods} == set(ours)
    for m in mods:
        want = theirs[m + ".lora_B.weight"].float() @ theirs[m + ".lora_A.weight"].float()
        torch.testing.assert_close(_dense(ours[m + ".weight"]), want, rtol=0, atol=1e-6, msg=m)


def test_agrees_with_diffusers_converters(tmp_path, base):
    """Independent oracle: diffusers' kohya and XLabs converters (kohya's hard-coded widths patched to tiny)."""
    import diffusers.loaders.lora_conversion_utils as lcu

    shapes = model_shapes(base)
    path, _ = _make(tmp_path, base, "xlabs")
    from safetensors.torch import load_file
    _compare_with_diffusers(load_flux_lora(path, shapes), lcu._convert_xlabs_flux_lora_to_diffusers(load_file(path)))
    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    if "dims=[3072, 3072, 3072, 12288]" not in src:
        pytest.skip("diffusers' kohya converter changed shape; nothing to patch")
    scope = dict(vars(lcu))
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{W}, {W}, {W}, {4 * W}]"), scope)
    path, _ = _make(tmp_path, base, "kohya")
    sd = load_file(path)
    # diffusers ignores alpha on final_layer ("TODO: alphas"), so compare those with alpha dropped
    sd = {k: v for k, v in sd.items() if not (k.startswith("lora_unet_final_layer") and k.endswith(".alpha"))}
    save_file(sd, str(path))
    _compare_with_diffusers(load_flux_lora(path, shapes), scope["_convert_kohya_flux_lora_to_diffusers"](dict(sd)))


# ---- bad files: always LoraError, always naming the file

def _error(path, shapes, *needles):
    with pytest.raises(LoraError) as exc:
        load_flux_lora(path, shapes)
    msg = str(exc.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_sdxl_lora_is_rejected(tmp_path, base):
    path = tmp_path / "sdxl.safetensors"
    n = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({n + ".lora_down.weight": torch.zeros(4, 640), n + ".lora_up.weight": torch.zeros(640, 4),
               n + ".alpha": torch.tensor(4.0), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)},
              str(path))
    _error(path, model_shapes(base), "3 keys are not LoRA weights", "SD1.x/SDXL", n)


def test_mismatched_shapes_are_rejected(tmp_path, base):
    path = tmp_path / "big.safetensors"
    n = "lora_unet_double_blocks_0_img_attn_qkv"  # a LoRA for full-size FLUX.1 (width 3072)
    save_file({n + ".lora_down.weight": torch.zeros(4, 3072), n + ".lora_up.weight": torch.zeros(9216, 4),
               "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(100, 4)}, str(path))
    _error(path, model_shapes(base), "2 LoRA weights do not match", f"'{n}' expects 3072 inputs, model has 128")


@pytest.mark.parametrize("sd,needle", [
    ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 128),
      "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(128, 4)}, "not LoRA weights"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 128)}, "only a down weight"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(4, 4)}, "not supported"),
    ({}, "no LoRA weights"),
])
def test_other_bad_files(tmp_path, base, sd, needle):
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    _error(path, model_shapes(base), needle)


def test_unreadable_file_and_wrong_model_in_merger(tmp_path, base):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file" * 20)
    _error(path, model_shapes(base), "not a readable")
    _error(tmp_path / "missing.safetensors", model_shapes(base), "not a readable")
    lora_path, _ = _make(tmp_path, base, "diffusers")
    lora = load_flux_lora(lora_path, model_shapes(base))
    other = make_tiny_flux(seed=2, num_layers=1)  # lacks transformer_blocks.1
    merger = LoraMerger(other)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LoraError, match="diffusers_1.safetensors"):
        merger.set_loras([("a", lora, 1.0)])
    _assert_state(other, before, exact=True)  # nothing was touched
    only_te = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}, str(only_te))
    te = load_flux_lora(only_te, model_shapes(base))
    assert len(te) == 0 and te.text_encoder_keys == 1


def test_onetrainer_names_duplicates_and_pickling(tmp_path, base):
    """A module named twice (OneTrainer diffusers-underscore name + kohya BFL name) gets both deltas, as in ComfyUI."""
    import pickle

    g = torch.Generator().manual_seed(5)
    bfl = diffusers_to_bfl(base.state_dict())
    d1, u1, delta1 = _pair(g, W, W, 4)
    d2, u2, delta2 = _pair(g, *bfl["double_blocks.0.img_attn.qkv.weight"].shape, 2)
    d3, u3, delta3 = _pair(g, *bfl["single_blocks.1.linear2.weight"].shape, 2)
    sd = {"lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight": d1,
          "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight": u1,
          "lora_transformer_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": d2,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": u2,
          "lycoris_single_transformer_blocks_1_proj_out.lora_down.weight": d3,
          "lycoris_single_transformer_blocks_1_proj_out.lora_up.weight": u3,
          "lycoris_single_transformer_blocks_1_proj_out.diff_b": torch.full((W,), 0.25)}
    path = tmp_path / "ot.safetensors"
    save_file(sd, str(path))
    lora = pickle.loads(pickle.dumps(load_flux_lora(path, model_shapes(base))))  # workers receive it pickled
    assert lora.format == "kohya+onetrainer" and lora.path == str(path)
    info = lora_rank_info(lora)
    assert info["ranks"] == {2: 3, 4 + 2: 1} and info["full_deltas"] == 1 and info["weights"] == 5
    model = copy.deepcopy(base)
    LoraMerger(model).set_loras([("ot", lora, 0.5)])
    want = _expected(base, (({"double_blocks.0.img_attn.qkv.weight": delta2, "single_blocks.1.linear2.weight": delta3,
                               "single_blocks.1.linear2.bias": torch.full((W,), 0.25)},
                              {"transformer_blocks.0.attn.to_q.weight": delta1 * 0.5}), 0.5))
    _assert_state(model, want)
