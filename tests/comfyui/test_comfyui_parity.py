"""Sampler (xDiT) against ComfyUI's own KSampler in a real ComfyUI 0.3.64 server, on the same files, in fp32.

Each comparison is a pair of SaveLatent outputs in one workflow: Load Diffusion Model (xDiT) (weight_dtype fp32)
-> [LoRA (xDiT)] -> [ModelSampling* (xDiT)] -> Sampler (xDiT), and beside it UNETLoader (weight_dtype default:
fp32 on the CPU) -> [LoraLoaderModelOnly] -> [ModelSamplingSD3 / ModelSamplingFlux] -> KSampler, with the same
conditioning (CLIPLoader type sd3 + CLIPTextEncode), latent, seed and settings. Relative L2 of the two LATENTs
<= 1e-4.

All one-rank comparisons go in one prompt, all two-rank ones in a second (a different rank count restarts the
pool, so each prompt keeps one); ComfyUI's cache keeps the text encoder and its MODELs between the two.
SD3 (a tiny SD3.5-Medium-shaped transformer) carries most cases at two sizes; Flux (full width, 1 + 1 blocks: what
ComfyUI's detection can load) is slow on the CPU, so it has a few 4-step cases at 128 px.
"""

from __future__ import annotations

import sys
import time

import pytest

from tests.comfyui.helpers import (FLUX, FLUX_LORA, IMAGE, SD3, SD3_LORA, Workflow, common_nodes, pool_ranks, rel_l2,
                                   xdit_loader)

TOLERANCE = 1e-4
SIZES = ((128, 128), (192, 128))  # width x height, px
BASE = dict(seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)

# case -> what differs from BASE: sampler settings, plus lora (strength), shift (SD3) / flux_shift (Flux:
# ModelSamplingFlux at the image size), batch (latent batch size), img2img (ComfyUI's VAEEncode of a picture).
SD3_CASES = {
    "euler_simple": {},
    "dpmpp_2m_beta": dict(sampler_name="dpmpp_2m", scheduler="beta", steps=5),
    "cfg2_negative": dict(cfg=2.0),
    "lora": dict(lora=0.8),
    "img2img_denoise_0.6": dict(img2img=True, denoise=0.6, steps=5),
    "batch2": dict(batch=2, seed=11),
    "model_sampling_sd3": dict(shift=5.0),
}
FLUX_CASES = {
    "euler_simple": {},
    "dpmpp_2m_beta": dict(sampler_name="dpmpp_2m", scheduler="beta"),
    "cfg2_negative": dict(cfg=2.0),
    "model_sampling_flux": dict(flux_shift=True),
    "lora": dict(lora=1.0),
}
FLUX_SIZE = (128, 128)
# two ranks: every SD3 case with Ulysses 2, cfg 2 also with CFG parallel; Flux with Ulysses 2
TWO_RANKS = ([("sd3", case, size, "ulysses") for case in SD3_CASES for size in SIZES]
             + [("sd3", "cfg2_negative", size, "cfg_parallel") for size in SIZES]
             + [("flux", "euler_simple", FLUX_SIZE, "ulysses"), ("flux", "cfg2_negative", FLUX_SIZE, "cfg_parallel")])
ONE_RANK = ([("sd3", case, size) for case in SD3_CASES for size in SIZES]
            + [("flux", case, FLUX_SIZE) for case in FLUX_CASES])

XFAIL: dict = {}  # (family, case, size[, strategy]) -> reason, for real mismatches (strict)


def _id(key) -> str:
    family, case, (w, h), *strategy = key
    return "-".join([family, case, f"{w}x{h}"] + strategy)


def _params(keys):
    return [pytest.param(k, id=_id(k), marks=[pytest.mark.xfail(reason=XFAIL[k], strict=True)] if k in XFAIL else [])
            for k in keys]


class _Builder:
    """Adds the nodes of one case to a workflow: the latent, the model chains, the samplers, the SaveLatents.
    Latents and model chains are shared between cases where their inputs are equal."""

    def __init__(self, wf: Workflow, flux: bool):
        self.wf = wf
        self.c = common_nodes(wf, sd3=True, flux=flux, vae=True)
        self.nodes: dict = {}

    def _once(self, key, make):
        if key not in self.nodes:
            self.nodes[key] = make()
        return self.nodes[key]

    def latent(self, case: dict, size) -> str:
        w, h = size
        wf = self.wf
        if case.get("img2img"):
            image = self._once("image", lambda: wf.add("LoadImage", image=IMAGE))  # 192 x 128
            pixels = image if size == (192, 128) else self._once(
                ("crop", size), lambda: wf.add("ImageCrop", image=wf.out(image), width=w, height=h, x=32, y=0))
            return self._once(("encode", size), lambda: wf.add("VAEEncode", pixels=wf.out(pixels),
                                                               vae=wf.out(self.c.vae)))
        batch = case.get("batch", 1)
        return self._once(("empty", size, batch),
                          lambda: wf.add("EmptySD3LatentImage", width=w, height=h, batch_size=batch))

    def xdit_model(self, family: str, case: dict, size, gpus: int, strategy: str) -> str:
        wf = self.wf
        model = self._once(("xdit", family, gpus, strategy),
                           lambda: xdit_loader(wf, FLUX if family == "flux" else SD3, gpus=gpus, strategy=strategy))
        if "lora" in case:
            model = self._once(("xdit_lora", model), lambda: wf.add(
                "XDiTLoraLoader", model=wf.out(model), lora_name=FLUX_LORA if family == "flux" else SD3_LORA,
                strength_model=case["lora"]))
        if "shift" in case:
            model = self._once(("xdit_shift", model), lambda: wf.add("XDiTModelSamplingSD3", model=wf.out(model),
                                                                     shift=case["shift"]))
        if case.get("flux_shift"):
            model = self._once(("xdit_fshift", model, size), lambda: wf.add(
                "XDiTModelSamplingFlux", model=wf.out(model), max_shift=1.15, base_shift=0.5, width=size[0],
                height=size[1]))
        return model

    def comfy_model(self, family: str, case: dict, size) -> str:
        wf = self.wf
        model = self.c.flux_unet if family == "flux" else self.c.sd3_unet
        if "lora" in case:
            model = self._once(("lora", model), lambda: wf.add(
                "LoraLoaderModelOnly", model=wf.out(model), lora_name=FLUX_LORA if family == "flux" else SD3_LORA,
                strength_model=case["lora"]))
        if "shift" in case:
            model = self._once(("shift", model), lambda: wf.add("ModelSamplingSD3", model=wf.out(model),
                                                                shift=case["shift"]))
        if case.get("flux_shift"):
            model = self._once(("fshift", model, size), lambda: wf.add(
                "ModelSamplingFlux", model=wf.out(model), max_shift=1.15, base_shift=0.5, width=size[0],
                height=size[1]))
        return model

    def sampler(self, cls: str, family: str, model: str, case: dict, latent: str, label: str) -> str:
        wf = self.wf
        pos, neg = ((self.c.flux_positive, self.c.flux_negative) if family == "flux"
                    else (self.c.positive, self.c.negative))
        settings = {k: case.get(k, v) for k, v in BASE.items()}
        node = wf.add(cls, model=wf.out(model), positive=wf.out(pos), negative=wf.out(neg),
                      latent_image=wf.out(latent), **settings)
        return wf.save_latent(node, label)


def _cases(family: str) -> dict:
    return FLUX_CASES if family == "flux" else SD3_CASES


def _timed_run(comfy, wf, what: str, timeout: float) -> dict:
    t = time.monotonic()
    entry = comfy.run(wf, timeout=timeout)
    sys.stderr.write(f"\n[comfyui] {what}: {len(wf)} nodes in {time.monotonic() - t:.1f} s\n")
    return entry


@pytest.fixture(scope="module")
def one_rank(comfy) -> dict:
    """(family, case, size) -> (Sampler (xDiT) on 1 rank, KSampler) LATENTs, from one prompt."""
    wf = Workflow()
    b = _Builder(wf, flux=True)
    saves = {}
    for key in ONE_RANK:
        family, name, size = key
        case = _cases(family)[name]
        latent = b.latent(case, size)
        label = _id(key).replace(".", "_")
        saves[key] = (b.sampler("XDiTSampler", family, b.xdit_model(family, case, size, 1, "auto"), case, latent,
                                label + "_xdit"),
                      b.sampler("KSampler", family, b.comfy_model(family, case, size), case, latent, label + "_comfy"))
    entry = _timed_run(comfy, wf, f"one-rank prompt ({len(ONE_RANK)} comparisons)", timeout=900)
    assert len(pool_ranks(comfy.proc.pid)) == 1, "the one-rank prompt did not leave a pool of 1 rank"
    return {k: (comfy.latent(entry, a), comfy.latent(entry, c)) for k, (a, c) in saves.items()}


@pytest.fixture(scope="module")
def two_ranks(comfy) -> dict:
    """(family, case, size, strategy) -> Sampler (xDiT) LATENT on 2 ranks, from one prompt."""
    wf = Workflow()
    b = _Builder(wf, flux=True)
    saves = {}
    for key in TWO_RANKS:
        family, name, size, strategy = key
        case = _cases(family)[name]
        latent = b.latent(case, size)
        saves[key] = b.sampler("XDiTSampler", family, b.xdit_model(family, case, size, 2, strategy), case, latent,
                               _id(key).replace(".", "_"))
    entry = _timed_run(comfy, wf, f"two-rank prompt ({len(TWO_RANKS)} samplers)", timeout=900)
    assert len(pool_ranks(comfy.proc.pid)) == 2, "the two-rank prompt did not leave a pool of 2 ranks"
    return {k: comfy.latent(entry, s) for k, s in saves.items()}


def _report(what: str, value: float) -> None:
    sys.stderr.write(f"[comfyui] {what}: relative L2 {value:.2e}\n")


@pytest.mark.parametrize("key", _params(ONE_RANK))
def test_sampler_xdit_matches_ksampler(one_rank, key):
    ours, theirs = one_rank[key]
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    w, h = key[2]
    batch = _cases(key[0])[key[1]].get("batch", 1)
    assert tuple(ours.shape) == (batch, 16, h // 8, w // 8)
    err = rel_l2(ours, theirs)
    _report(f"{_id(key)}: Sampler (xDiT) 1 rank vs KSampler", err)
    assert err <= TOLERANCE, f"{_id(key)}: Sampler (xDiT) vs KSampler relative L2 {err:.3e}"


@pytest.mark.parametrize("key", _params(TWO_RANKS))
def test_two_ranks_match_one_rank_and_ksampler(one_rank, two_ranks, key):
    ours = two_ranks[key]
    single, theirs = one_rank[key[:3]]
    to_comfy, to_single = rel_l2(ours, theirs), rel_l2(ours, single)
    _report(f"{_id(key)}: Sampler (xDiT) 2 ranks vs KSampler", to_comfy)
    _report(f"{_id(key)}: Sampler (xDiT) 2 ranks vs 1 rank", to_single)
    assert to_comfy <= TOLERANCE, f"{_id(key)}: 2 ranks vs KSampler relative L2 {to_comfy:.3e}"
    assert to_single <= TOLERANCE, f"{_id(key)}: 2 ranks vs 1 rank relative L2 {to_single:.3e}"


@pytest.mark.parametrize("family,case", [("sd3", c) for c in ("dpmpp_2m_beta", "cfg2_negative", "lora",
                                                              "model_sampling_sd3")]
                         + [("flux", c) for c in ("dpmpp_2m_beta", "cfg2_negative", "model_sampling_flux", "lora")])
def test_each_setting_changes_the_result(one_rank, family, case):
    """The comparisons above mean something only where the setting changes the result: each case against the
    euler/simple one of the same family and size (KSampler's results, so this checks the test, not the pack)."""
    size = FLUX_SIZE if family == "flux" else SIZES[0]
    changed, plain = one_rank[(family, case, size)][1], one_rank[(family, "euler_simple", size)][1]
    diff = rel_l2(changed, plain)
    _report(f"{family} {case} vs euler_simple (KSampler)", diff)
    assert diff > 1e-2, f"{family} {case} hardly differs from euler/simple ({diff:.2e}): the case tests nothing"
