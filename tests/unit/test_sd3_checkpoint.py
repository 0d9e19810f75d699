"""SD3 / SD3.5 single-file checkpoint loading: layouts, storage dtypes, fp8, stage-only reads, config inference
from shapes (full-size configs on meta), the SAI <-> diffusers mapping against diffusers' converter, bad files."""

import re

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as diffusers_convert
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import save_file

from comfy_xdit.models.checkpoint import COMFY_PREFIX, CheckpointError, read_header, read_state_dict
from comfy_xdit.models.fp8 import FP8, Fp8Linear
from comfy_xdit.models.sd3.checkpoint import (SD3_BLOCKS, detect_sd3_layout, load_sd3_transformer, read_sd3_info,
                                              sai_from_diffusers, sd3_config_from_shapes, sd3_variant)
from comfy_xdit.models.sd3.random import random_sd3, sd3_config
from tests.flux_tiny import tiny_checkpoint as tiny_flux_checkpoint
from tests.sd3_tiny import (TINY_PRESETS, VARIANTS, make_tiny_sd3, recording_reads, rel_err, run_sd3, sd3_inputs,
                            write_sd3_checkpoint)

LAYOUTS = ("sai", "comfy", "full", "diffusers")


@pytest.fixture(scope="module")
def models():
    return {p: make_tiny_sd3(p, seed=i) for i, p in enumerate(TINY_PRESETS)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, models):
    """written(preset, layout, dtype=None) -> path of that model's file, written once per module."""
    directory, cache = tmp_path_factory.mktemp("sd3"), {}

    def get(preset, layout, dtype=None):
        if (preset, layout, dtype) not in cache:
            name = f"{preset}-{layout}-{str(dtype).removeprefix('torch.')}.safetensors"
            cache[preset, layout, dtype] = write_sd3_checkpoint(models[preset], directory / name, layout=layout,
                                                                dtype=dtype)
        return cache[preset, layout, dtype]

    return get


def _resident_state(model, stage=None, fp8=False) -> dict:
    """Keys and kept dtypes of ``model`` cut to a stage and/or with fp8 blocks: a meta twin goes through
    SD3_BLOCKS.keep_stage / store_fp8, so nothing is copied."""
    with torch.device("meta"):
        twin = SD3Transformer2DModel(**model.config)
    if stage is not None:
        SD3_BLOCKS.keep_stage(twin, *stage)
    if fp8:
        SD3_BLOCKS.store_fp8(twin)
    return twin.state_dict()


def _cut(sd: dict, model, stage=None, fp8=False) -> dict:
    """What load-then-keep_stage / store_fp8 of a model with state ``sd`` holds: the resident keys, fp8 ones cast."""
    return {k: sd[k].to(FP8) if v.dtype == FP8 else sd[k] for k, v in _resident_state(model, stage, fp8).items()}


def _same(got: dict, want: dict):
    """Same keys, dtypes and bits."""
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and not got[k].is_meta, k
        a, b = (got[k].view(torch.uint8), want[k].view(torch.uint8)) if want[k].dtype == FP8 else (got[k], want[k])
        assert torch.equal(a, b), k


def _transformer_keys(header):
    return [k for k in header if k.startswith(COMFY_PREFIX)] or list(header)


def _nbytes(header, keys):
    return sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_load_matches_original(models, written, preset, layout):
    model = models[preset]
    path = written(preset, layout)
    header = read_header(path)
    with recording_reads() as read:
        loaded, info = load_sd3_transformer(path, dtype=torch.float32)
    assert set(read) == set(_transformer_keys(header))  # a full file's text encoders and VAE are never read
    _same(loaded.state_dict(), model.state_dict())
    x = sd3_inputs(model.config)
    out, want = run_sd3(loaded, x), run_sd3(model, x)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert out.shape == x["hidden_states"].shape and want.std() > 0.1  # not two near-zero outputs
    assert info.layout == ("diffusers" if layout == "diffusers" else "sai") and info.variant == VARIANTS[preset]
    assert info.config == sd3_config(preset) and info.full_checkpoint == (layout == "full")
    assert info.stored_dtypes == {"float32"} and info.path == str(path)
    assert read_sd3_info(path) == info
    if layout != "diffusers":  # the loader's meta-validated path equals diffusers' converter on the whole file
        _same(loaded.state_dict(), diffusers_convert(read_state_dict(path)))


@pytest.mark.parametrize("preset,layout,dtype", [("tiny-sd3.5-medium", "sai", torch.bfloat16),
                                                 ("tiny-sd3-medium", "diffusers", torch.float16),
                                                 ("tiny-sd3.5-large", "full", torch.bfloat16)])
def test_half_precision_files_load_upcast(models, written, preset, layout, dtype):
    model = models[preset]
    loaded, info = load_sd3_transformer(written(preset, layout, dtype), dtype=torch.float32)
    # what a correct loader must give: the weights through dtype storage, back in float32
    _same(loaded.state_dict(), {k: v.to(dtype).float() for k, v in model.state_dict().items()})
    assert info.stored_dtypes == {str(dtype).removeprefix("torch.")}
    x = sd3_inputs(model.config)
    assert rel_err(run_sd3(loaded, x), run_sd3(model, x)) < 0.05


def _check_fp8_model(model):
    linears = [m for m in model.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Fp8Linear and m.weight.dtype == FP8 for m in linears)
    assert model.pos_embed.proj.weight.dtype == model.norm_out.linear.weight.dtype != FP8  # outside the blocks
    assert all(m.bias.dtype != FP8 for m in linears)


@pytest.mark.parametrize("preset,layout", [(p, "sai") for p in TINY_PRESETS] + [("tiny-sd3.5-medium", "diffusers")])
def test_fp8_storage_equals_a_cast_of_the_whole_model(models, written, preset, layout):
    model = models[preset]
    loaded, _ = load_sd3_transformer(written(preset, layout), dtype=torch.float32, fp8=True)
    _check_fp8_model(loaded)
    _same(loaded.state_dict(), _cut(model.state_dict(), model, fp8=True))  # the same plain cast, in memory
    # and what random weights with fp8 storage give (SD3_BLOCKS.store_fp8 on the whole model, cast as drawn)
    _same(loaded.state_dict(), random_sd3(sd3_config(preset), seed=TINY_PRESETS.index(preset), fp8=True).state_dict())
    x = sd3_inputs(model.config)
    assert rel_err(run_sd3(loaded, x), run_sd3(model, x)) < 0.05


def test_fp8_file_keeps_its_bytes(written):
    """An fp8-stored SAI file: fused qkv and the swapped last-block modulation are split in fp8, bytes unchanged."""
    path = written("tiny-sd3.5-medium", "comfy", FP8)
    loaded, info = load_sd3_transformer(path, dtype=torch.bfloat16, fp8=True)
    assert info.stored_dtypes == {"float8_e4m3fn"}
    _check_fp8_model(loaded)
    theirs = diffusers_convert(read_state_dict(path))  # all fp8, as stored
    got = loaded.state_dict()
    assert got.keys() == theirs.keys()
    for k, v in got.items():
        want = theirs[k] if v.dtype == FP8 else theirs[k].to(torch.bfloat16)
        assert v.dtype in (FP8, torch.bfloat16) and torch.equal(v.view(torch.uint8), want.view(torch.uint8)), k
    assert got["transformer_blocks.3.norm1_context.linear.weight"].dtype == FP8


def _resident(key: str, start: int, stop: int, n: int) -> bool:
    """A stage's keys (prefix stripped, either layout), written out independently of the loader's mapping."""
    if m := re.match(r"(joint_blocks|transformer_blocks)\.(\d+)\.", key):
        return start <= int(m.group(2)) < stop
    if key.startswith(("pos_embed", "x_embedder.", "context_embedder.")):
        return start == 0
    if key.startswith(("final_layer.", "norm_out.", "proj_out.")):
        return stop == n
    return key.startswith(("t_embedder.", "y_embedder.", "time_text_embed."))  # every stage; never a VAE's


@pytest.mark.parametrize("layout", ["full", "diffusers"])
def test_stage_load_reads_only_its_tensors_and_equals_load_then_keep_stage(models, written, layout):
    model = models["tiny-sd3.5-medium"]  # 4 blocks, dual attention in the first two
    path = written("tiny-sd3.5-medium", layout)
    header, n = read_header(path), 4
    whole = load_sd3_transformer(path, dtype=torch.float32)[0].state_dict()
    theirs = diffusers_convert(read_state_dict(path)) if layout != "diffusers" else read_state_dict(path)
    for start, stop in [(0, 2), (1, 3), (2, 4)]:
        with recording_reads() as read:
            part, _ = load_sd3_transformer(path, dtype=torch.float32, stage=(start, stop))
        want = {k for k in header if _resident(k.removeprefix(COMFY_PREFIX), start, stop, n)}
        assert set(read) == want and sum(read.values()) == _nbytes(header, want)
        assert sum(read.values()) < 0.75 * _nbytes(header, _transformer_keys(header))
        _same(part.state_dict(), _cut(whole, model, (start, stop)))  # = load everything, then keep_stage
        _same(part.state_dict(), _cut(theirs, model, (start, stop)))  # = diffusers' converter on the whole file
    # fp8 and the last stage: the last block's swapped modulation is converted in fp8 beside meta placeholders
    part, _ = load_sd3_transformer(path, dtype=torch.float32, stage=(2, 4), fp8=True)
    _same(part.state_dict(), _cut(whole, model, (2, 4), fp8=True))


def test_load_reports_the_bytes_it_reads(written):
    path = written("tiny-sd3-medium", "full")
    header = read_header(path)
    keys = _transformer_keys(header)
    assert len(keys) < len(header)  # the stand-in text encoders and VAE: never read, never counted
    calls = []
    load_sd3_transformer(path, dtype=torch.float32, progress=lambda done, total: calls.append((done, total)))
    total = _nbytes(header, keys)
    assert len(calls) == len(keys) and calls[-1] == (total, total)
    assert all(a[0] < b[0] and a[1] == b[1] == total for a, b in zip(calls, calls[1:]))
    stage = []
    load_sd3_transformer(path, dtype=torch.float32, stage=(0, 1),
                         progress=lambda done, total: stage.append((done, total)))
    assert stage[-1][0] == stage[-1][1] < total  # a PipeFusion stage reads only its blocks


def test_random_stage_and_fp8_equal_the_whole_model_cut():
    config = sd3_config("tiny-sd3.5-medium")
    whole = SD3_BLOCKS.store_fp8(SD3_BLOCKS.keep_stage(random_sd3(config, seed=5, dtype=torch.bfloat16), 1, 4))
    part = random_sd3(config, seed=5, dtype=torch.bfloat16, fp8=True, stage=(1, 4))
    _same(part.state_dict(), whole.state_dict())


# ---- the mapping and config inference

@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_sai_from_diffusers_is_the_exact_inverse_of_diffusers_converter(models, preset):
    sd = models[preset].state_dict()
    sai = sai_from_diffusers(sd)
    left = dict(sai)
    back = diffusers_convert(left)
    assert not left  # the converter consumed every SAI key: none made up, none missing
    _same(back, sd)
    config = sd3_config(preset)
    n, w = config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]
    assert sai["joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * w, w)
    # SAI stores shift then scale, diffusers scale then shift (the head and the last block's text modulation)
    assert torch.equal(sai["final_layer.adaLN_modulation.1.weight"][:w], sd["norm_out.linear.weight"][w:])
    assert torch.equal(sai[f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1.bias"][w:],
                       sd[f"transformer_blocks.{n - 1}.norm1_context.linear.bias"][:w])
    assert sd3_config_from_shapes(sai, "sai") == sd3_config_from_shapes(sd, "diffusers") == sd3_config(preset)


# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium and -3.5-large
_HUB = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048)
DIFFUSERS_CONFIGS = {
    "sd3-medium": dict(_HUB, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None),
    "sd3.5-medium": dict(_HUB, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_HUB, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
}
DIFFUSERS_TYPES = {"sd3-medium": "sd3", "sd3.5-medium": "sd35_medium", "sd3.5-large": "sd35_large"}


@pytest.mark.parametrize("name", list(DIFFUSERS_CONFIGS))
def test_full_size_config_from_shapes(name):
    config = DIFFUSERS_CONFIGS[name]
    assert sd3_config(name) == config
    with torch.device("meta"):  # shapes only: nothing is allocated
        sd = SD3Transformer2DModel(**config).state_dict()
    assert all(t.is_meta for t in sd.values())
    assert detect_sd3_layout(sd) == "diffusers" and sd3_config_from_shapes(sd, "diffusers") == config
    sai = sai_from_diffusers(sd)
    assert all(t.is_meta for t in sai.values())
    assert detect_sd3_layout(sai) == "sai" and sd3_config_from_shapes(sai, "sai") == config
    assert sd3_variant(config) == name
    # diffusers' own single-file detection names the same release from the SAI keys
    assert infer_diffusers_model_type({COMFY_PREFIX + k: v for k, v in sai.items()}) == DIFFUSERS_TYPES[name]
    back = diffusers_convert(dict(sai))  # the converter runs on meta tensors: the loader's validation
    assert back.keys() == sd.keys() and all(back[k].shape == sd[k].shape for k in sd)


def test_detect_only_sd3_transformers():
    assert detect_sd3_layout([]) is None
    assert detect_sd3_layout(["x_embedder.proj.weight", "joint_blocks.0.x_block.attn.qkv.weight"]) == "sai"
    assert detect_sd3_layout(["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"]) == "diffusers"
    # Flux's diffusers layout: the same block keys, but x_embedder.weight and no patch-embed conv
    assert detect_sd3_layout(["x_embedder.weight", "transformer_blocks.0.attn.to_q.weight",
                              "single_transformer_blocks.0.attn.to_q.weight"]) is None
    # PixArt-like (attn1) and SD3 ControlNets (controlnet_blocks) are not SD3 transformers
    assert detect_sd3_layout(["pos_embed.proj.weight", "transformer_blocks.0.attn1.to_q.weight"]) is None
    assert detect_sd3_layout(["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight",
                              "controlnet_blocks.0.weight"]) is None


# ---- bad files: always CheckpointError, always naming the file, before any tensor is read

def _expect_error(path, *needles, header_level=True):
    """header_level: the header alone shows the problem, so read_sd3_info refuses the file too (a missing or
    misshapen tensor shows only when the loader checks the file against the model)."""
    with recording_reads() as read:
        with pytest.raises(CheckpointError) as exc:
            load_sd3_transformer(path, dtype=torch.float32)
    assert not read
    msg = str(exc.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    if header_level:
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            read_sd3_info(path)
    return msg


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_flux_file(tmp_path, layout):
    path, _ = tiny_flux_checkpoint(tmp_path, layout=layout)
    assert detect_sd3_layout(list(read_header(path))) is None
    _expect_error(path, "SD3", "Flux.1")


@pytest.mark.parametrize("keys", [
    ["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"],
    ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight"]])
def test_vae_file(tmp_path, keys):
    path = tmp_path / "vae.safetensors"
    save_file({k: torch.zeros(4, 3, 3, 3) for k in keys}, str(path))
    assert detect_sd3_layout(keys) is None
    _expect_error(path, "SD3", "VAE")


def test_truncated_file(tmp_path, written):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(written("tiny-sd3-medium", "sai").read_bytes()[:-1000])
    _expect_error(path, "truncated", "SD3")


def _sai(model):
    return {k: v.clone() for k, v in sai_from_diffusers(model.state_dict()).items()}


def test_missing_extra_and_misshapen_keys(tmp_path, models):
    model = models["tiny-sd3.5-medium"]
    sai = _sai(model)
    del sai["joint_blocks.1.x_block.mlp.fc2.weight"]
    save_file({COMFY_PREFIX + k: v for k, v in sai.items()}, str(tmp_path / "miss.safetensors"))
    _expect_error(tmp_path / "miss.safetensors", "missing", "joint_blocks.1.x_block.mlp.fc2.weight",
                  header_level=False)

    sai = {k: v for k, v in _sai(models["tiny-sd3-medium"]).items() if not k.startswith("joint_blocks.1.")}
    save_file(sai, str(tmp_path / "gap.safetensors"))  # a whole block gone from the middle
    _expect_error(tmp_path / "gap.safetensors", "missing", "joint_blocks.1.", header_level=False)

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["transformer_blocks.1.attn2.norm_k.weight"]
    save_file(sd, str(tmp_path / "dmiss.safetensors"))
    _expect_error(tmp_path / "dmiss.safetensors", "missing", "transformer_blocks.1.attn2.norm_k.weight",
                  header_level=False)

    sai = _sai(model)
    sai["joint_blocks.0.x_block.attn.qkv.lora_down.weight"] = torch.ones(2, 2)
    save_file(sai, str(tmp_path / "extra.safetensors"))
    _expect_error(tmp_path / "extra.safetensors", "unexpected", "lora_down", header_level=False)

    sai = _sai(model)
    rows, cols = sai["joint_blocks.2.context_block.mlp.fc1.weight"].shape
    sai["joint_blocks.2.context_block.mlp.fc1.weight"] = torch.zeros(rows // 2, cols)
    save_file(sai, str(tmp_path / "shape.safetensors"))
    _expect_error(tmp_path / "shape.safetensors", "shapes do not fit", "ff_context.net.0.proj.weight",
                  header_level=False)

    sai = _sai(model)
    sai["pos_embed"] = torch.zeros(1, 250, cols)
    save_file(sai, str(tmp_path / "pos.safetensors"))  # config from shapes refuses it: the header is enough
    _expect_error(tmp_path / "pos.safetensors", "pos_embed", "square grid")
