"""Qwen-Image under every parallel method on real gloo processes vs a single-process run.

A tiny random Qwen-Image transformer (4 heads of 128, 2 dual-stream blocks), written as ComfyUI ships it
(diffusers names under model.diffusion_model.) and loaded through the family registry. 5-D latents
[B, 16, 1, h, w] of a non-square 6 x 8 (12 image tokens, split by 2 and 4); text lengths that do (8) and do
not (7) divide the ranks: the joint [text | image] sequence splits the text with the image when it divides,
else every rank holds the text whole. Qwen-Image-Edit: a reference latent of another size (4 x 8) appended
after the image tokens and sharded with them. CFG at 4 with a negative of another length than the positive.
One spawn per world size runs every case; fresh random inputs each run (TEST_SEED replays one).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.mesh import build_mesh
from comfy_xdit.models.dit import DiTModel
from comfy_xdit.pipefusion import PipeFusionOptions
from comfy_xdit.pipefusion.stage import PipeFusionModel
from comfy_xdit.sampling import sample
from tests.flux_tiny import rel_err, spmd_per_world_size
from tests.qwen_tiny import qwen_cond, tiny_qwen_checkpoint

TOL = 1e-4
STALE_TOL = 4e-3  # the Flux PipeFusion test's measured bound for warmup 1 of 8 steps
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
HW = (6, 8)            # latent 6 x 8: 3 x 4 = 12 image tokens
REFS = ((4, 8),)       # Edit: one reference latent of 4 x 8 (8 more tokens: 20 in the sharded sequence)
STEPS = 8
CFG = 4.0
NEG_LEN = 5            # the negative prompt's length (the positive's differs)
U2, R2, U4 = dict(ulysses_degree=2), dict(ring_degree=2), dict(ulysses_degree=4)
U2R2, CFG2, DP2 = dict(ulysses_degree=2, ring_degree=2), dict(cfg_degree=2), dict(dp_degree=2)
PP2, PP2U2 = dict(pipefusion_degree=2), dict(pipefusion_degree=2, ulysses_degree=2)
# name -> (degrees, PipeFusion warmup steps or None, text lengths, batch, reference latents, guided)
LAYOUTS = {
    2: {"ulysses2": (U2, None, (8, 7), 1, (), False), "ulysses2_edit": (U2, None, (7,), 1, REFS, True),
        "ring2": (R2, None, (8, 7), 1, (), False), "ring2_edit": (R2, None, (8,), 1, REFS, False),
        "cfg2": (CFG2, None, (7,), 1, (), True), "cfg2_edit": (CFG2, None, (8,), 1, REFS, True),
        "dp2": (DP2, None, (7,), 2, (), False), "pp2_sync": (PP2, STEPS, (7,), 1, (), True),
        "pp2_stale": (PP2, 1, (7,), 1, (), False)},
    4: {"ulysses4": (U4, None, (8, 7), 1, (), False), "ulysses4_edit": (U4, None, (7,), 1, REFS, False),
        "ulysses2_ring2": (U2R2, None, (7,), 1, (), True), "pp2_ulysses2_sync": (PP2U2, STEPS, (8,), 1, (), False)},
}


def _inputs(seed: int, text_len: int, config: dict, batch: int, refs: tuple) -> dict:
    g = torch.Generator().manual_seed(seed + text_len + 100 * batch + 7 * len(refs))
    shape = (batch, 16, 1, *HW)
    return dict(positive=qwen_cond(config, batch, text_len, g, refs),
                negative=qwen_cond(config, batch, NEG_LEN, g, refs),
                latent=torch.randn(*shape, generator=g), sigma=float(torch.rand((), generator=g)) * 0.9 + 0.05,
                noise_seed=int(torch.randint(0, 2**31, (), generator=g)))


def _run(model, inp: dict, guided: bool) -> dict:
    out = {}
    if not isinstance(model, PipeFusionModel):  # a PipeFusion denoiser is one run's: sample() drives it
        out["forward"] = model.denoiser(inp["positive"], tuple(inp["latent"].shape))(inp["latent"], inp["sigma"])
    out["denoise"] = sample(model, inp["positive"], torch.zeros_like(inp["latent"]), seed=inp["noise_seed"],
                            steps=STEPS, cfg=CFG if guided else 1.0, negative=inp["negative"] if guided else None)
    return out


def _rank_main(rank: int, world_size: int, path: str, seed: int, config: dict):
    results = {}
    for name, (degrees, warmup, text_lens, batch, refs, guided) in LAYOUTS[world_size].items():
        mesh = build_mesh(ParallelConfig(**degrees), "cpu")
        model = DiTModel.load(path, dtype=torch.float32, mesh=mesh)
        if warmup is not None:
            model = PipeFusionModel(model, PipeFusionOptions(num_pipeline_patch=3, warmup_steps=warmup))
        for text_len in text_lens:
            for kind, x in _run(model, _inputs(seed, text_len, config, batch, refs), guided).items():
                results[(name, kind, text_len)] = x
    if world_size == 2:  # PipeFusion's row patches cannot hold Edit's reference tokens: refused, not dropped
        model = PipeFusionModel(DiTModel.load(path, dtype=torch.float32, mesh=build_mesh(ParallelConfig(**PP2), "cpu")),
                                PipeFusionOptions(num_pipeline_patch=3, warmup_steps=1))
        inp = _inputs(seed, 7, config, 1, REFS)
        try:
            sample(model, inp["positive"], torch.zeros_like(inp["latent"]), seed=1, steps=2)
        except ValueError as e:
            results["refused"] = str(e)
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model = tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen"), seed=SEED % 1000, layout="comfy")
    return path, dict(model.config)


@pytest.fixture(scope="module")
def reference(checkpoint):
    path, config = checkpoint
    needed = {(t, batch, refs, guided) for layouts in LAYOUTS.values()
              for _, _, lens, batch, refs, guided in layouts.values() for t in lens}
    model = DiTModel.load(path, dtype=torch.float32)
    out = {}
    for text_len, batch, refs, guided in sorted(needed):
        for kind, x in _run(model, _inputs(SEED, text_len, config, batch, refs), guided).items():
            out[(kind, text_len, batch, refs, guided)] = x
    return out


@pytest.fixture(scope="module")
def parallel(checkpoint):
    path, config = checkpoint
    return spmd_per_world_size(_rank_main, path, SEED, config)


CASES = [(ws, name, kind, t) for ws, layouts in LAYOUTS.items()
         for name, (_, warmup, lens, _, _, _) in layouts.items()
         for kind in (("denoise",) if warmup else ("forward", "denoise")) for t in lens]


@pytest.mark.parametrize("world_size,name,kind,text_len", CASES,
                         ids=[f"ws{c[0]}-{c[1]}-{c[2]}-text{c[3]}" for c in CASES])
def test_parallel_matches_single_process(parallel, reference, world_size, name, kind, text_len):
    _, _, _, batch, refs, guided = LAYOUTS[world_size][name]
    expected = reference[(kind, text_len, batch, refs, guided)]
    tol = STALE_TOL if name.endswith("_stale") else TOL
    for rank, results in enumerate(parallel(world_size)):
        got = results[(name, kind, text_len)]
        assert got.shape == expected.shape == (batch, 16, 1, *HW)
        err = rel_err(got, expected)
        assert err <= tol, f"seed {SEED}: rank {rank} {name} {kind} text {text_len}: rel err {err:.2e}"


def test_stale_pipefusion_is_approximate_not_exact(parallel, reference):
    got = parallel(2)[0][("pp2_stale", "denoise", 7)]
    assert rel_err(got, reference[("denoise", 7, 1, (), False)]) > 1e-6


def test_reference_latents_change_the_result(checkpoint):
    """The Edit cases test something: the same latent and text with and without the reference latent give
    different predictions."""
    path, config = checkpoint
    model = DiTModel.load(path, dtype=torch.float32)
    inp = _inputs(SEED, 7, config, 1, REFS)
    cond = model.family.prepare_conditioning(config, dict(inp["positive"]), tuple(inp["latent"].shape))
    sigma = torch.tensor([inp["sigma"]])
    with torch.inference_mode():  # the velocities (x0 predictions are dominated by x itself)
        with_ref = model.forward(inp["latent"], sigma, cond)
        without = model.forward(inp["latent"], sigma, {"context": cond["context"]})
    assert rel_err(with_ref, without) > 1e-2


def test_pipefusion_refuses_reference_latents(parallel):
    for results in parallel(2):
        assert "PipeFusion cannot run Qwen-Image with ref_latents" in results["refused"]


def test_reference_is_not_trivial(reference):
    for key, x in reference.items():
        assert torch.isfinite(x).all() and x.std() > 0.05, key
