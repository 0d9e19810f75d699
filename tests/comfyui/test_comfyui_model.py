"""xDiT Model to MODEL in a real ComfyUI 0.3.64 server: ComfyUI's own samplers drive the pool.

Each comparison is a pair of SaveLatent outputs in one workflow, in fp32: the same ComfyUI sampler node(s) on
the xDiT MODEL (Load Diffusion Model (xDiT) -> xDiT Model to MODEL) and on UNETLoader's MODEL of the same file.
Relative L2 <= 1e-4. One prompt per rank count (another rank count restarts the pool); the two-rank prompt holds
a cfg-parallel and a Ulysses model of one pool. Also: the Sampler (xDiT) and KSampler on the MODEL from one
loader (no reload), LoraLoaderModelOnly refused with the reason, and every node of the example workflows known
to the real server with the widgets the UI files give it.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.comfyui.helpers import FLUX, REPO, SD3, SD3_LORA, PromptFailed, Workflow, common_nodes, rel_l2, xdit_loader

TOLERANCE = 1e-4
BASE = dict(seed=5, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
# case -> (sampler kind, what differs from BASE; size (w, h); latent batch). Sampler kinds: ksampler, advanced
# (KSamplerAdvanced, two chained: steps 0-2 with leftover noise, then 2-end without adding noise), custom
# (SamplerCustomAdvanced with CFGGuider, KSamplerSelect, BasicScheduler), area (ConditioningSetArea +
# ConditioningCombine: ComfyUI calls the model on crops). EasyCache has its own test, on Flux.
CASES = {
    "ksampler_euler_128": ("ksampler", {}, (128, 128), 1),
    "ksampler_dpmpp_2m_beta_cfg2_192x128": ("ksampler", dict(sampler_name="dpmpp_2m", scheduler="beta", cfg=2.0),
                                            (192, 128), 1),
    "ksampler_res_multistep_karras_cfg3": ("ksampler", dict(sampler_name="res_multistep", scheduler="karras",
                                                            cfg=3.0, steps=5), (128, 128), 1),
    "ksampler_batch3_cfg2": ("ksampler", dict(cfg=2.0, seed=9), (128, 128), 3),
    "ksampler_model_sampling_sd3": ("ksampler", dict(shift=6.0), (128, 128), 1),
    "advanced_chained": ("advanced", dict(steps=6, cfg=2.0), (128, 128), 1),
    "custom_cfg_guider": ("custom", dict(sampler_name="heun", scheduler="sgm_uniform", cfg=2.5), (192, 128), 1),
    "area_crop": ("area", dict(cfg=2.0), (128, 128), 1),
}
TWO_RANKS = {"cfg_parallel": ["ksampler_dpmpp_2m_beta_cfg2_192x128", "ksampler_batch3_cfg2", "advanced_chained",
                              "custom_cfg_guider", "area_crop"],
             "ulysses": ["ksampler_euler_128", "ksampler_res_multistep_karras_cfg3", "ksampler_model_sampling_sd3",
                         "area_crop"]}


def _sample(wf: Workflow, c, model: str, kind: str, settings: dict, latent: str) -> str:
    """The case's ComfyUI sampler node(s) on `model`; returns the node whose output 0 is the LATENT."""
    s = dict(BASE, **settings)
    shift = s.pop("shift", None)
    if shift is not None:
        model = wf.add("ModelSamplingSD3", model=wf.out(model), shift=shift)
    positive, negative = c.positive, c.negative
    if kind == "area":  # the prompt over the image plus one on an 80 x 72 px area: 9 x 10 latent, padded: 25 tokens
        area = wf.add("ConditioningSetArea", conditioning=wf.out(c.negative), width=80, height=72, x=16, y=32,
                      strength=1.0)
        positive = wf.add("ConditioningCombine", conditioning_1=wf.out(c.positive), conditioning_2=wf.out(area))
    if kind in ("ksampler", "area"):
        return wf.add("KSampler", model=wf.out(model), positive=wf.out(positive), negative=wf.out(negative),
                      latent_image=wf.out(latent), **s)
    if kind == "advanced":
        common = dict(model=wf.out(model), noise_seed=s["seed"], steps=s["steps"], cfg=s["cfg"],
                      sampler_name=s["sampler_name"], scheduler=s["scheduler"], positive=wf.out(positive),
                      negative=wf.out(negative))
        first = wf.add("KSamplerAdvanced", add_noise="enable", latent_image=wf.out(latent), start_at_step=0,
                       end_at_step=2, return_with_leftover_noise="enable", **common)
        return wf.add("KSamplerAdvanced", add_noise="disable", latent_image=wf.out(first), start_at_step=2,
                      end_at_step=10000, return_with_leftover_noise="disable", **common)
    noise = wf.add("RandomNoise", noise_seed=s["seed"])
    guider = wf.add("CFGGuider", model=wf.out(model), positive=wf.out(positive), negative=wf.out(negative),
                    cfg=s["cfg"])
    sampler = wf.add("KSamplerSelect", sampler_name=s["sampler_name"])
    sigmas = wf.add("BasicScheduler", model=wf.out(model), scheduler=s["scheduler"], steps=s["steps"],
                    denoise=s["denoise"])
    return wf.add("SamplerCustomAdvanced", noise=wf.out(noise), guider=wf.out(guider), sampler=wf.out(sampler),
                  sigmas=wf.out(sigmas), latent_image=wf.out(latent))


def _prompt(layouts: dict) -> tuple[Workflow, dict]:
    """One workflow: for each (label, loader kwargs) -> case names, every case on the xDiT MODEL and on
    UNETLoader's; returns it and {(label, case): (ours, theirs) SaveLatent ids}."""
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    saves, latents = {}, {}
    for label, (loader, cases) in layouts.items():
        xmodel = wf.add("XDiTModelToComfy", model=wf.out(xdit_loader(wf, SD3, **loader)))
        for case in cases:
            kind, settings, (w, h), batch = CASES[case]
            key = (w, h, batch)
            if key not in latents:
                latents[key] = wf.add("EmptySD3LatentImage", width=w, height=h, batch_size=batch)
            ours = _sample(wf, c, xmodel, kind, settings, latents[key])
            theirs = _sample(wf, c, c.sd3_unet, kind, settings, latents[key])
            saves[(label, case)] = (wf.save_latent(ours, f"model_{label}_{case}_xdit"),
                                    wf.save_latent(theirs, f"model_{label}_{case}_comfy"))
    return wf, saves


def _results(comfy, layouts: dict) -> dict:
    wf, saves = _prompt(layouts)
    entry = comfy.run(wf, timeout=900)
    return {key: (comfy.latent(entry, a), comfy.latent(entry, b)) for key, (a, b) in saves.items()}


@pytest.fixture(scope="module")
def one_rank(comfy) -> dict:
    return _results(comfy, {"1rank": (dict(gpus=1), list(CASES))})


@pytest.fixture(scope="module")
def two_ranks(comfy, one_rank) -> dict:
    return _results(comfy, {label: (dict(gpus=2, strategy=label), cases) for label, cases in TWO_RANKS.items()})


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_samplers_on_the_xdit_model_match_comfyuis_model(one_rank, case):
    ours, theirs = one_rank[("1rank", case)]
    assert ours.shape == theirs.shape
    assert rel_l2(ours, theirs) <= TOLERANCE, f"{case}: {rel_l2(ours, theirs):.2e}"


@pytest.mark.parametrize("label,case", [(label, case) for label, cases in TWO_RANKS.items() for case in cases])
def test_two_ranks_match_comfyuis_model(two_ranks, one_rank, label, case):
    ours, theirs = two_ranks[(label, case)]
    assert rel_l2(ours, theirs) <= TOLERANCE, f"{label} {case}: {rel_l2(ours, theirs):.2e}"
    assert rel_l2(ours, one_rank[("1rank", case)][0]) <= TOLERANCE


def test_the_cases_differ(one_rank):
    """Each sampler setting gives its own result, so a case cannot pass by both sides ignoring it."""
    plain = one_rank[("1rank", "ksampler_euler_128")][1]
    for case in ("ksampler_res_multistep_karras_cfg3", "ksampler_model_sampling_sd3", "advanced_chained",
                 "area_crop"):
        assert rel_l2(one_rank[("1rank", case)][1], plain) > 1e-2, case


def test_easycache_skips_pool_calls_as_it_skips_comfyuis_flux_calls(comfy, two_ranks):
    """EasyCache wraps the diffusion model's forward: ComfyUI's Flux runs DIFFUSION_MODEL wrappers, and so does the
    proxy, so the same calls are skipped on both (ComfyUI's SD3 runs none: EasyCache does nothing to it there,
    while the xDiT MODEL honours it). Full-width Flux, 128 px, 10 steps, Ulysses 2."""
    wf = Workflow()
    c = common_nodes(wf, sd3=False, flux=True)
    xmodel = wf.add("XDiTModelToComfy", model=wf.out(xdit_loader(wf, FLUX, gpus=2, strategy="ulysses")))
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    s = dict(BASE, seed=13, steps=10)

    def ksampler(model, cached):
        if cached:
            model = wf.add("EasyCache", model=wf.out(model), reuse_threshold=0.2, start_percent=0.15,
                           end_percent=0.95, verbose=False)
        return wf.save_latent(wf.add("KSampler", model=wf.out(model), positive=wf.out(c.flux_positive),
                                     negative=wf.out(c.flux_negative), latent_image=wf.out(latent), **s))

    saves = {(side, cached): ksampler(model, cached) for side, model in (("xdit", xmodel), ("comfy", c.flux_unet))
             for cached in (True, False)}
    entry = comfy.run(wf, timeout=900)
    out = {k: comfy.latent(entry, v) for k, v in saves.items()}
    assert rel_l2(out[("xdit", True)], out[("comfy", True)]) <= TOLERANCE
    assert rel_l2(out[("xdit", False)], out[("comfy", False)]) <= TOLERANCE
    assert rel_l2(out[("xdit", True)], out[("xdit", False)]) > 1e-3, "EasyCache skipped no call"


def test_one_loader_serves_the_sampler_xdit_and_ksampler_alike(comfy, two_ranks):
    """Both paths on one loaded model in one prompt (the MODEL's calls name the worker model the loader loaded)."""
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    loader = xdit_loader(wf, SD3, gpus=2, strategy="ulysses")
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    s = dict(BASE, seed=21, cfg=2.0)
    fused = wf.add("XDiTSampler", model=wf.out(loader), positive=wf.out(c.positive), negative=wf.out(c.negative),
                   latent_image=wf.out(latent), **s)
    stepwise = wf.add("KSampler", model=wf.out(wf.add("XDiTModelToComfy", model=wf.out(loader))),
                      positive=wf.out(c.positive), negative=wf.out(c.negative), latent_image=wf.out(latent), **s)
    a, b = wf.save_latent(fused, "mixed_fused"), wf.save_latent(stepwise, "mixed_stepwise")
    entry = comfy.run(wf, timeout=600)
    assert rel_l2(comfy.latent(entry, a), comfy.latent(entry, b)) <= TOLERANCE


def test_comfyuis_lora_loader_on_the_xdit_model_is_refused_with_the_way_out(comfy, two_ranks):
    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    model = wf.add("XDiTModelToComfy", model=wf.out(xdit_loader(wf, SD3, gpus=2, strategy="ulysses")))
    lora = wf.add("LoraLoaderModelOnly", model=wf.out(model), lora_name=SD3_LORA, strength_model=0.7)
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    wf.save_latent(wf.add("KSampler", model=wf.out(lora), positive=wf.out(c.positive), negative=wf.out(c.negative),
                          latent_image=wf.out(latent), **dict(BASE, seed=33)), "lora_refused")
    with pytest.raises(PromptFailed, match="LoRA \\(xDiT\\)"):
        comfy.run(wf, timeout=300)


def test_example_workflows_use_only_nodes_the_server_knows(comfy):
    """What ComfyUI's frontend needs to load them without missing nodes: every class in the API files exists
    on the server and takes those inputs; every UI node's widget values fit its widget inputs."""
    info = comfy.get("/object_info", timeout=120)
    checked = 0
    for path in sorted(glob.glob(os.path.join(REPO, "example_workflows", "api", "*.json"))):
        with open(path) as f:
            for node_id, node in json.load(f).items():
                assert node["class_type"] in info, (path, node["class_type"])
                spec = info[node["class_type"]]["input"]
                known = set(spec.get("required", {})) | set(spec.get("optional", {}))
                assert set(spec.get("required", {})) <= set(node["inputs"]), (path, node_id)
                assert set(node["inputs"]) <= known, (path, node_id, set(node["inputs"]) - known)
                checked += 1
    for path in sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json"))):
        with open(path) as f:
            for node in json.load(f)["nodes"]:
                assert node["type"] in info, (path, node["type"])
    assert checked >= 40


def test_cancel_of_ksampler_on_the_xdit_model_leaves_the_pool_usable(comfy, two_ranks):
    """ComfyUI's interrupt stops its own sampler between model calls; the pool was never mid-request then."""
    from tests.comfyui.helpers import Events, descendants
    from tests.comfyui.test_comfyui_server import _check_usable

    wf = Workflow()
    c = common_nodes(wf, sd3=True)
    model = wf.add("XDiTModelToComfy", model=wf.out(xdit_loader(wf, SD3, gpus=2, strategy="ulysses")))
    latent = wf.add("EmptySD3LatentImage", width=128, height=128, batch_size=1)
    steps = 10000
    sampler = wf.add("KSampler", model=wf.out(model), positive=wf.out(c.positive), negative=wf.out(c.negative),
                     latent_image=wf.out(latent), **dict(BASE, seed=77, steps=steps))
    wf.save_latent(sampler, "model_cancelled")
    with Events(comfy) as events:
        prompt_id = comfy.submit(wf)
        try:
            events.wait_for(lambda m: m["type"] == "progress" and m["data"].get("node") == sampler
                            and m["data"].get("value", 0) >= 3, timeout=240)
            pool = set(descendants(comfy.proc.pid))
            comfy.interrupt()
            entry = comfy.wait(prompt_id, timeout=60)
        finally:  # never leave minutes of sampling in the queue for the next test
            if comfy.get(f"/history/{prompt_id}").get(prompt_id) is None:
                comfy.request("/queue", {"delete": [prompt_id]})
                comfy.interrupt()
                comfy.wait(prompt_id, timeout=60)
    kinds = [kind for kind, _ in entry["status"].get("messages", [])]
    assert entry["status"].get("status_str") == "error" and "execution_interrupted" in kinds, entry["status"]
    _check_usable(comfy)
    assert set(descendants(comfy.proc.pid)) == pool, "Cancel restarted the worker pool"
