"""The nodes end to end on real CPU worker pools: files in a models folder in the real formats,
conditioning -> sampler -> latent -> VAE decode -> IMAGE, compared across rank counts and with
references computed here."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import fake_comfy
from comfy_xdit.models.flux import FluxModel, flux_conditioning
from comfy_xdit.models.flux.checkpoint import diffusers_to_bfl, write_flux_checkpoint
from comfy_xdit.models.flux.controlnet import random_flux_controlnet, write_flux_controlnet
from comfy_xdit.models.flux.random import flux_config, random_flux
from comfy_xdit.models.dit import DiTModel
from comfy_xdit.models.sd3.checkpoint import write_sd3_checkpoint
from comfy_xdit.models.sd3.random import random_sd3, sd3_config
from comfy_xdit.sampling import sample
from comfy_xdit.vae.loader import write_vae_checkpoint

STEPS = 3
LORA_RANK = 4


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "vae", "loras", "controlnet"):
        os.makedirs(models / sub)
    transformer = random_flux(flux_config("tiny"), seed=11)
    write_flux_checkpoint(transformer, models / "diffusion_models" / "flux_tiny.safetensors", layout="comfy")
    # SD3.5-Medium-shaped (dual attention, q/k norm), as SAI's all-in-one file: text encoders and VAE beside it
    write_sd3_checkpoint(random_sd3(sd3_config("tiny-sd3.5-medium"), seed=12),
                         models / "diffusion_models" / "sd35_tiny.safetensors", layout="full")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    write_vae_checkpoint(vae, models / "vae" / "ae_tiny.safetensors", layout="ldm")
    # A kohya LoRA on the first double block's fused image qkv (BFL name), with alpha.
    g = torch.Generator().manual_seed(5)
    qkv = diffusers_to_bfl(transformer.state_dict())["double_blocks.0.img_attn.qkv.weight"]
    down = torch.randn(LORA_RANK, qkv.shape[1], generator=g) * 0.5
    up = torch.randn(qkv.shape[0], LORA_RANK, generator=g) * 0.5
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)},
              str(models / "loras" / "style.safetensors"))
    union = random_flux_controlnet(dict(transformer.config), num_layers=1, num_single_layers=1, num_mode=4, seed=2)
    write_flux_controlnet(union, models / "controlnet" / "union_tiny.safetensors", layout="diffusers")
    xlabs = random_flux_controlnet(dict(transformer.config), num_layers=1, num_single_layers=0, xlabs=True, seed=4)
    write_flux_controlnet(xlabs, models / "controlnet" / "xlabs_tiny.safetensors", layout="xlabs")
    state = fake_comfy.install(str(models))
    pack = fake_comfy.load_pack()
    yield pack, state, models, (down, up, 2.0 / LORA_RANK)
    pack.nodes.ENGINE.shutdown()
    fake_comfy.uninstall()


def _conditioning(seed=0, text=7):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, text, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                     "guidance": 3.0}]]


def _latent(h=8, w=12, batch=1):
    return {"samples": torch.zeros(batch, 16, h, w)}  # EmptySD3LatentImage


def _run(pack, gpus, lora_strength=None, latent=None, seed=3):
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", gpus, "auto")
    if lora_strength is not None:
        (model,) = nodes["XDiTLoraLoader"]().apply(model, "style.safetensors", lora_strength)
    (out,) = nodes["XDiTSampler"]().sample(model, _conditioning(), _conditioning(1), latent or _latent(), seed, STEPS,
                                           1.0, "euler", "simple", 1.0)
    return out


def test_loader_shows_the_file_being_read(env):
    pack, state, _, _ = env
    state.progress.clear()
    pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp16", 1, "auto")  # a fresh load
    assert state.progress and state.progress[-1] == (100, 100)
    steps = [step for step, total in state.progress]
    assert steps == sorted(set(steps)) and all(total == 100 for _, total in state.progress)


def test_txt2img_to_image_on_two_ranks_equals_one_rank(env):
    pack, state, models, _ = env
    nodes = pack.NODE_CLASS_MAPPINGS
    two = _run(pack, 2)
    (vae,) = nodes["XDiTVAELoader"]().load("ae_tiny.safetensors", 2)
    (image,) = nodes["XDiTVAEDecode"]().decode(two, vae)
    assert image.shape == (1, 64, 96, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0
    assert state.progress[-STEPS:] == [(1, STEPS), (2, STEPS), (3, STEPS)]
    one = _run(pack, 1)
    assert _rel(two["samples"], one["samples"]) <= 1e-4
    # the reference: the same file sampled in this process
    model = FluxModel.load(str(models / "diffusion_models" / "flux_tiny.safetensors"), dtype=torch.float32)
    cond = _conditioning()[0]
    ref = sample(model, flux_conditioning(cond[0], cond[1]["pooled_output"], 3.0), _latent()["samples"], seed=3,
                 steps=STEPS)
    assert _rel(two["samples"], ref) <= 1e-4
    # the patch-parallel VAE on 2 ranks equals one rank
    (encoded,) = nodes["XDiTVAEEncode"]().encode(image, vae)
    assert encoded["samples"].shape == (1, 16, 8, 12)
    (vae_one,) = nodes["XDiTVAELoader"]().load("ae_tiny.safetensors", 1)
    (image_one,) = nodes["XDiTVAEDecode"]().decode(two, vae_one)
    (encoded_one,) = nodes["XDiTVAEEncode"]().encode(image, vae_one)
    assert float((image - image_one).abs().max()) <= 1e-5
    assert float((encoded["samples"] - encoded_one["samples"]).abs().max()) <= 1e-5
    assert state.memory_calls == []  # CPU ranks: nothing asked of ComfyUI's model management


def test_sd3_through_the_same_nodes_cfg_parallel_and_shift(env):
    """An SD3.5 full checkpoint through the loader, ModelSamplingSD3 (xDiT) and the sampler at cfg 4.5 on 2
    ranks (cfg parallel, Ulysses, PipeFusion) and on 1 equals the same file sampled here; the shift reaches the
    workers."""
    pack, _, models, _ = env
    nodes = pack.NODE_CLASS_MAPPINGS
    g = torch.Generator().manual_seed(21)

    def cond():
        return [[torch.randn(1, 9, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]

    positive, negative = cond(), cond()
    results = {}
    runs = ((2, "cfg_parallel", None, {}), (1, "auto", None, {}), (2, "ulysses", 6.0, {}),
            (2, "pipefusion", None, dict(pipefusion_degree=2, num_pipeline_patch=2, warmup_steps=STEPS)))
    for gpus, strategy, shift, options in runs:  # pipefusion: stage-only reads of the SAI file, synchronous steps
        (model,) = nodes["XDiTModelLoader"]().load("sd35_tiny.safetensors", "fp32", gpus, strategy, **options)
        if shift is not None:
            (model,) = nodes["XDiTModelSamplingSD3"]().patch(model, shift)
        (out,) = nodes["XDiTSampler"]().sample(model, positive, negative, _latent(h=12, w=8), 7, STEPS, 4.5,
                                               "euler", "simple", 1.0)
        results[(gpus, shift, strategy)] = out["samples"]
    ref_model = DiTModel.load(str(models / "diffusion_models" / "sd35_tiny.safetensors"), dtype=torch.float32)
    assert ref_model.family.name == "sd3" and ref_model.info.full_checkpoint

    def reference(shift):
        ref_model.shift = shift
        return sample(ref_model, {"context": positive[0][0], "pooled": positive[0][1]["pooled_output"]},
                      _latent(h=12, w=8)["samples"], seed=7, steps=STEPS, cfg=4.5,
                      negative={"context": negative[0][0], "pooled": negative[0][1]["pooled_output"]})

    ref = reference(None)
    for key in ((2, None, "cfg_parallel"), (1, None, "auto"), (2, None, "pipefusion")):
        assert _rel(results[key], ref) <= 1e-4, key
    shifted = reference(6.0)
    assert _rel(results[(2, 6.0, "ulysses")], shifted) <= 1e-4 and _rel(shifted, ref) > 1e-3


def test_lora_strength_zero_is_the_base_and_one_is_a_hand_merge(env):
    pack, _, models, (down, up, scale) = env
    base = _run(pack, 2)["samples"]
    assert torch.equal(_run(pack, 2, lora_strength=0.0)["samples"], base)
    merged = _run(pack, 2, lora_strength=1.0)["samples"]
    model = FluxModel.load(str(models / "diffusion_models" / "flux_tiny.safetensors"), dtype=torch.float32)
    delta = scale * up @ down  # fused qkv rows: q, k, v
    attn = model.transformer.transformer_blocks[0].attn
    with torch.no_grad():
        for i, linear in enumerate((attn.to_q, attn.to_k, attn.to_v)):
            linear.weight += delta[i * linear.weight.shape[0]:(i + 1) * linear.weight.shape[0]]
    cond = _conditioning()[0]
    ref = sample(model, flux_conditioning(cond[0], cond[1]["pooled_output"], 3.0), _latent()["samples"], seed=3,
                 steps=STEPS)
    assert _rel(merged, ref) <= 1e-4 and _rel(merged, base) > 1e-3
    assert torch.equal(_run(pack, 2)["samples"], base)  # removing the LoRA restores the base exactly


def test_cancel_mid_run_then_a_normal_run(env):
    pack, state, _, _ = env
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", 2, "auto")
    progress_bar = pack.nodes.comfy.utils.ProgressBar
    original = progress_bar.update_absolute

    def interrupt_at_two(self, value, total=None, preview=None):
        original(self, value, total, preview)
        if value == 2:
            state.interrupted = True

    progress_bar.update_absolute = interrupt_at_two
    try:
        with pytest.raises(fake_comfy.InterruptProcessingException):
            nodes["XDiTSampler"]().sample(model, _conditioning(), _conditioning(1), _latent(), 0, 500, 1.0, "euler",
                                          "simple", 1.0)
    finally:
        progress_bar.update_absolute = original
    assert state.progress[-1][0] < 10  # stopped within a step or two, not after 500
    out = _run(pack, 2)
    assert out["samples"].shape == (1, 16, 8, 12)


def test_bad_inputs_give_clear_errors(env):
    pack, _, _, _ = env
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", 2, "auto")
    with pytest.raises(RuntimeError, match="multiples of 16 px"):
        nodes["XDiTSampler"]().sample(model, _conditioning(), _conditioning(1), _latent(h=7), 0, 2, 1.0, "euler",
                                      "simple", 1.0)
    too_many = pack.nodes.available_devices()[1] + 1
    with pytest.raises(ValueError, match=f"asked for {too_many} GPUs but"):
        nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", too_many, "auto")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        nodes["XDiTModelLoader"]().load("nothing.safetensors", "fp32", 2, "auto")


def _controlled(pack, gpus, name, strength, vae=None, mode=-1):
    nodes = pack.NODE_CLASS_MAPPINGS
    (model,) = nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", gpus, "auto")
    (control,) = nodes["XDiTControlNetLoader"]().load(name)
    image = torch.rand(1, 70, 100, 3, generator=torch.Generator().manual_seed(8))  # fitted to 64x96 in the workers
    positive, negative = nodes["XDiTApplyControlNet"]().apply(_conditioning(), _conditioning(1), control, image,
                                                              strength, 0.0, 1.0, vae, mode)
    (out,) = nodes["XDiTSampler"]().sample(model, positive, negative, _latent(), 3, STEPS, 1.0, "euler", "simple", 1.0)
    return out["samples"]


@pytest.mark.parametrize("name,mode", [("union_tiny.safetensors", 2), ("xlabs_tiny.safetensors", -1)])
def test_controlnet_runs_in_the_workers_under_the_sequence_split(env, name, mode):
    pack, _, _, _ = env
    (vae,) = pack.NODE_CLASS_MAPPINGS["XDiTVAELoader"]().load("ae_tiny.safetensors", 2)
    base = _run(pack, 2)["samples"]
    assert torch.equal(_controlled(pack, 2, name, 0.0, vae, mode), base)  # strength 0 is no ControlNet
    two = _controlled(pack, 2, name, 1.0, vae, mode)
    one = _controlled(pack, 1, name, 1.0, vae, mode)
    assert _rel(two, one) <= 1e-4 and _rel(two, base) > 1e-3


def test_instantx_controlnet_without_a_vae_says_what_to_connect(env):
    pack, _, _, _ = env
    with pytest.raises(RuntimeError, match="takes a VAE-encoded control image: connect a VAE"):
        _controlled(pack, 2, "union_tiny.safetensors", 1.0, None, 1)


@pytest.mark.parametrize("strategy,cfg,batch", [("cfg_parallel", 3.0, 1), ("data_parallel", 1.0, 3)])
def test_cfg_and_data_parallel_strategies_match_one_rank(env, strategy, cfg, batch):
    pack, state, _, _ = env
    nodes = pack.NODE_CLASS_MAPPINGS
    outs = []
    for gpus, strat in ((2, strategy), (1, "auto")):
        (model,) = nodes["XDiTModelLoader"]().load("flux_tiny.safetensors", "fp32", gpus, strat)
        (out,) = nodes["XDiTSampler"]().sample(model, _conditioning(), _conditioning(1), _latent(batch=batch), 5,
                                               STEPS, cfg, "euler", "simple", 1.0)
        outs.append(out["samples"])
    assert outs[0].shape == (batch, 16, 8, 12) and _rel(outs[0], outs[1]) <= 1e-4
