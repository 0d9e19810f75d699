"""Wan text-to-video and image-to-video as a new user runs them in a real ComfyUI, ending in a saved video.

T2V: CLIPTextEncode -> EmptyHunyuanLatentVideo -> Sampler (xDiT) -> VAE Decode (xDiT) with the Wan 2.1 VAE ->
SaveWEBM (and the frames as PNGs). I2V (a Wan 2.2 I2V-shaped model: 36 input channels): LoadImage ->
WanImageToVideo (ComfyUI's VAELoader encodes the start frame) -> Sampler (xDiT) beside KSampler on the same file
-> VAE Decode (xDiT) -> SaveWEBM. Checked: each prompt succeeds, the .webm files exist and are not empty, the
frames decoded by the pool equal ComfyUI's own VAEDecode of the same latent (8-bit PNGs: at most 1 level apart),
and the I2V latents of the two samplers agree (relative L2 <= 1e-4). One rank and two (Ulysses, bands of the VAE).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.comfyui.helpers import IMAGE, WAN_HIGH, WAN_I2V, WAN_VAE, Workflow, common_nodes, rel_l2, xdit_loader

SIZE = dict(width=64, height=48, length=5)  # 2 latent frames of 6 x 8: 24 video tokens; 5 frames decoded
SETTINGS = dict(seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="simple", denoise=1.0)


def _frames(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(paths)])


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def run(request, comfy):
    gpus = request.param
    wf = Workflow()
    c = common_nodes(wf, sd3=False, positive="waves rolling onto a beach at sunset", negative="static, blurry")
    xvae = wf.add("XDiTVAELoader", vae_name=WAN_VAE, gpus=gpus)
    cvae = wf.add("VAELoader", vae_name=WAN_VAE)
    # T2V
    t2v_latent = wf.add("EmptyHunyuanLatentVideo", **SIZE, batch_size=1)
    model = xdit_loader(wf, WAN_HIGH, gpus=gpus, strategy="ulysses" if gpus > 1 else "auto")
    t2v = wf.add("XDiTSampler", model=wf.out(model), positive=wf.out(c.positive), negative=wf.out(c.negative),
                 latent_image=wf.out(t2v_latent), **SETTINGS)
    frames = wf.add("XDiTVAEDecode", samples=wf.out(t2v), vae=wf.out(xvae))
    ids = dict(t2v_webm=wf.add("SaveWEBM", images=wf.out(frames), filename_prefix=f"cxd_t2v_{gpus}", codec="vp9",
                               fps=16.0, crf=32.0),
               t2v_ours=wf.add("SaveImage", images=wf.out(frames), filename_prefix=f"cxd_t2v_ours_{gpus}"),
               t2v_comfy=wf.add("SaveImage", images=wf.out(wf.add("VAEDecode", samples=wf.out(t2v), vae=wf.out(cvae))),
                                filename_prefix=f"cxd_t2v_comfy_{gpus}"))
    # I2V
    image = wf.add("LoadImage", image=IMAGE)
    cond = wf.add("WanImageToVideo", positive=wf.out(c.positive), negative=wf.out(c.negative), vae=wf.out(cvae),
                  start_image=wf.out(image), **SIZE, batch_size=1)
    i2v_x = xdit_loader(wf, WAN_I2V, gpus=gpus, strategy="cfg_parallel" if gpus > 1 else "auto")
    i2v_c = wf.add("UNETLoader", unet_name=WAN_I2V, weight_dtype="default")
    io = dict(positive=wf.out(cond, 0), negative=wf.out(cond, 1), latent_image=wf.out(cond, 2))
    ours = wf.add("XDiTSampler", model=wf.out(i2v_x), **io, **SETTINGS)
    theirs = wf.add("KSampler", model=wf.out(i2v_c), **io, **SETTINGS)
    ids.update(i2v_ours=wf.save_latent(ours, f"cxd_i2v_x_{gpus}"), i2v_comfy=wf.save_latent(theirs, f"cxd_i2v_c_{gpus}"),
               i2v_webm=wf.add("SaveWEBM", images=wf.out(wf.add("XDiTVAEDecode", samples=wf.out(ours),
                                                                vae=wf.out(xvae))),
                               filename_prefix=f"cxd_i2v_{gpus}", codec="vp9", fps=16.0, crf=32.0))
    entry = comfy.run(wf, timeout=900)
    return comfy, entry, ids


def test_videos_are_saved(run):
    comfy, entry, ids = run
    for key in ("t2v_webm", "i2v_webm"):
        paths = comfy.outputs(entry, ids[key])
        assert len(paths) == 1 and paths[0].endswith(".webm"), (key, entry["outputs"].get(ids[key]))
        assert os.path.getsize(paths[0]) > 1000


def test_pool_decode_equals_comfyuis(run):
    comfy, entry, ids = run
    ours, theirs = _frames(comfy.outputs(entry, ids["t2v_ours"])), _frames(comfy.outputs(entry, ids["t2v_comfy"]))
    assert ours.shape == theirs.shape == (5, 48, 64, 3)
    assert np.abs(ours - theirs).max() <= 1 and ours.std() > 2


def test_i2v_matches_ksampler(run):
    comfy, entry, ids = run
    ours, theirs = comfy.latent(entry, ids["i2v_ours"]), comfy.latent(entry, ids["i2v_comfy"])
    assert ours.shape == theirs.shape == (1, 16, 2, 6, 8)
    assert rel_l2(ours, theirs) <= 1e-4
