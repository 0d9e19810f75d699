"""Flux.1 single-file checkpoint loading: layouts, storage dtypes, config inference, bad files."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.models.checkpoint import CheckpointError, read_state_dict
from comfy_xdit.models.flux.checkpoint import (
    PREFIX, bfl_to_diffusers, detect_layout, diffusers_to_bfl, flux_config_from_state_dict, flux_variant,
    load_flux_transformer, rope_axes_for_head_dim)
from tests.flux_tiny import make_tiny_flux, tiny_flux_config, write_flux_checkpoint


@pytest.fixture(scope="module")
def dev():
    return make_tiny_flux(seed=0)


@pytest.fixture(scope="module")
def schnell():
    return make_tiny_flux(seed=1, guidance_embeds=False)


def _inputs(guidance=True, seed=123):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 24, 64, generator=g), encoder_hidden_states=torch.randn(1, 7, 64, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]) if guidance else None,
                img_ids=torch.randint(0, 8, (24, 3), generator=g).float(), txt_ids=torch.zeros(7, 3), return_dict=False)


def _roundtrip(model, dtype):
    """Copy of ``model`` whose weights went through ``dtype`` storage, i.e. what a correct loader must produce."""
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    return ref


@pytest.mark.parametrize("layout,dtype", [("bfl", None), ("comfy", None), ("diffusers", None),
                                          ("bfl", torch.float8_e4m3fn), ("comfy", torch.float8_e5m2),
                                          ("bfl", torch.float16), ("diffusers", torch.bfloat16)])
def test_load_matches_original(tmp_path, dev, layout, dtype):
    path = write_flux_checkpoint(dev, tmp_path / "flux.safetensors", layout=layout, dtype=dtype)
    model, info = load_flux_transformer(path, dtype=torch.float32)
    ref = dev if dtype is None else _roundtrip(dev, dtype)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.float32 and not got[k].is_meta, k
        assert torch.equal(got[k], want[k]), k
    x = _inputs()
    with torch.no_grad():
        out, expect = model(**x)[0], ref(**x)[0]
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
    assert out.std() > 0.1  # the comparison is not between two near-zero outputs
    if dtype is not None:  # lossy storage still resembles the fp32 model
        with torch.no_grad():
            orig = dev(**x)[0]
        assert (out - orig).norm() / orig.norm() < 0.2
    assert info.layout == ("diffusers" if layout == "diffusers" else "bfl")
    assert info.variant == "dev"
    assert info.stored_dtypes == {str(dtype or torch.float32).removeprefix("torch.")}
    cfg = tiny_flux_config(out_channels=64)
    assert info.config == {k: cfg[k] for k in info.config} and info.config.keys() == cfg.keys()


def test_bf16_target_and_schnell(tmp_path, dev, schnell):
    model, info = load_flux_transformer(write_flux_checkpoint(schnell, tmp_path / "s.safetensors"))
    assert info.variant == "schnell" and not info.config["guidance_embeds"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        out = model(**{k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v)
                       for k, v in _inputs(guidance=False).items()})[0]
        want = schnell(**_inputs(guidance=False))[0]
    assert (out.float() - want).norm() / want.norm() < 0.05
    assert flux_variant(flux_config_from_state_dict(dev.state_dict(), "diffusers")) == "dev"


def test_loaded_weights_do_not_alias_the_file(tmp_path, dev):
    """Same-dtype loads must own their memory: rewriting the file in place must not change the model."""
    path = write_flux_checkpoint(dev, tmp_path / "alias.safetensors", layout="diffusers")
    model, _ = load_flux_transformer(path, dtype=torch.float32)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - size // 2)
        f.write(b"\0" * (size // 2))
    got, want = model.state_dict(), dev.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mapping_is_exact_inverse(dev):
    sd = dev.state_dict()
    bfl = diffusers_to_bfl(sd)
    assert "double_blocks.1.img_attn.qkv.bias" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 128 + 4 * 128, 128)
    # BFL stores shift then scale; diffusers scale then shift
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"][:128], sd["norm_out.linear.weight"][128:])
    cfg = flux_config_from_state_dict(bfl, "bfl")
    back = bfl_to_diffusers({PREFIX + k: v for k, v in bfl.items()}, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_mapping_agrees_with_diffusers_converter(dev):
    """Independent oracle: diffusers' own BFL converter, with its hard-coded width patched to the tiny one."""
    import inspect

    import diffusers.loaders.single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        pytest.skip("diffusers' converter changed shape; nothing to patch")
    scope = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", "inner_dim = 128"), scope)
    sd = dev.state_dict()
    theirs = scope["convert_flux_transformer_checkpoint_to_diffusers"](
        {PREFIX + k: v for k, v in diffusers_to_bfl(sd).items()})
    assert theirs.keys() == sd.keys() and all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_detect_layout_and_read_subset(tmp_path, dev):
    path = write_flux_checkpoint(dev, tmp_path / "c.safetensors", layout="comfy")
    keys = list(read_state_dict(path))
    assert detect_layout(keys) == "bfl" and all(k.startswith(PREFIX) for k in keys)
    sub = read_state_dict(path, keys=[PREFIX + "img_in.weight"])
    assert list(sub) == [PREFIX + "img_in.weight"] and sub[PREFIX + "img_in.weight"].shape == (128, 64)
    assert detect_layout(dev.state_dict().keys()) == "diffusers"


@pytest.mark.parametrize("head_dim,axes", [(128, (16, 56, 56)), (32, (4, 14, 14)), (64, (8, 28, 28)),
                                           (96, (12, 42, 42))])
def test_rope_axes_rule(head_dim, axes):
    assert rope_axes_for_head_dim(head_dim) == axes


def test_full_size_dev_config_from_shapes():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        full = FluxTransformer2DModel(guidance_embeds=True)
    cfg = flux_config_from_state_dict({PREFIX + k: v for k, v in diffusers_to_bfl(full.state_dict()).items()}, "bfl")
    assert cfg == dict(patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                       pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    assert flux_variant(cfg) == "dev"


# ---- bad files: always CheckpointError, always naming the file

def _expect_error(path, *needles):
    with pytest.raises(CheckpointError) as exc:
        load_flux_transformer(path, dtype=torch.float32)
    msg = str(exc.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file" * 50)
    _expect_error(path, "not a readable safetensors file", "Flux.1")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        read_state_dict(path)


def test_corrupt_header(tmp_path, dev):
    path = write_flux_checkpoint(dev, tmp_path / "hdr.safetensors")
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    _expect_error(path, "header is corrupt")


def test_truncated_file(tmp_path, dev):
    path = write_flux_checkpoint(dev, tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    _expect_error(path, "truncated")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.safetensors", "not a readable")


@pytest.mark.parametrize("keys,hint", [
    (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.0.weight",
      "conditioner.embedders.0.weight"], "UNet"),
    (["encoder.conv_in.weight", "decoder.conv_out.weight"], "VAE"),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], "text encoder")])
def test_wrong_family(tmp_path, keys, hint):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    _expect_error(path, "Flux", hint)


def test_missing_and_extra_keys(tmp_path, dev):
    bfl = {k: v.clone() for k, v in diffusers_to_bfl(dev.state_dict()).items()}
    del bfl["double_blocks.0.txt_attn.proj.weight"]
    save_file(bfl, str(tmp_path / "miss.safetensors"))
    _expect_error(tmp_path / "miss.safetensors", "missing", "double_blocks.0.txt_attn.proj.weight")

    bfl = {k: v.clone() for k, v in diffusers_to_bfl(dev.state_dict()).items() if not k.startswith("double_blocks.0.")}
    save_file(bfl, str(tmp_path / "gap.safetensors"))  # a whole block gone from the middle
    _expect_error(tmp_path / "gap.safetensors", "missing", "double_blocks.0.")

    sd = {k: v.clone() for k, v in dev.state_dict().items()}
    del sd["single_transformer_blocks.1.attn.norm_k.weight"]
    save_file(sd, str(tmp_path / "dmiss.safetensors"))
    _expect_error(tmp_path / "dmiss.safetensors", "missing", "single_transformer_blocks.1.attn.norm_k.weight")

    bfl = {k: v.clone() for k, v in diffusers_to_bfl(dev.state_dict()).items()}
    bfl["double_blocks.0.img_attn.qkv.lora_down.weight"] = torch.ones(2, 2)
    save_file(bfl, str(tmp_path / "extra.safetensors"))
    _expect_error(tmp_path / "extra.safetensors", "unexpected", "lora_down")


def test_load_reports_the_bytes_it_reads(tmp_path, dev):
    path = tmp_path / "comfy.safetensors"
    write_flux_checkpoint(dev, path, layout="comfy")
    sd = read_state_dict(path)
    sd["first_stage_model.extra"] = torch.zeros(1000)  # not the transformer's: never read, never counted
    save_file(sd, str(path))
    calls = []
    load_flux_transformer(path, dtype=torch.float32, progress=lambda done, total: calls.append((done, total)))
    total = sum(v.numel() * v.element_size() for v in dev.state_dict().values())
    assert len(calls) == len(sd) - 1 and calls[-1] == (total, total)  # one call per transformer tensor in the file
    assert all(a[0] < b[0] and a[1] == b[1] == total for a, b in zip(calls, calls[1:]))
    stage = []
    load_flux_transformer(path, dtype=torch.float32, stage=(0, 1), progress=lambda done, total: stage.append(total))
    assert 0 < stage[-1] < total  # a PipeFusion stage reads only its blocks
