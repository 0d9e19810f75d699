"""HunyuanDiT under every parallel method but PipeFusion on real gloo processes vs a single-process run.

Tiny random HunyuanDiT v1.2 (written as Tencent's original keys) and v1.0 / v1.1 (image-size and style
conditions; written as ComfyUI holds them, under model.diffusion_model.) transformers of 6 blocks, so two long
skips run; loaded through the family registry. Image tokens are sharded for self-attention (each rank's skips are
its own shard's); the BERT + mT5 text is replicated and reached by cross-attention, so any text length runs
everywhere: the model's own (8 + 12 tokens, the BERT mask padded after 5) and a longer one (11 + 15). Discrete v
sampling; CFG at 6 with a negative of another length. PipeFusion refuses HunyuanDiT (the skips would cross
stages). One spawn per world size runs every case; fresh random inputs each run (TEST_SEED replays one).
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
from tests.hunyuan_dit_tiny import TINY_PRESETS, hunyuan_dit_cond, tiny_hunyuan_dit_checkpoint

TOL = 1e-4
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))
HW = (6, 8)     # latent 6 x 8: 3 x 4 = 12 image tokens, split by 2 and 4
ODD = (6, 12)   # 18 image tokens: split by 2, not by 4
# text name -> (BERT tokens, mT5 tokens, real (unpadded) BERT / mT5 tokens)
TEXTS = {"own": (8, 12, (5, 12)), "long": (11, 15, (11, 9))}
NEG = (9, 13, (9, 13))  # the negative prompt's lengths (the positive's differ)
STEPS = 8
CFG = 6.0
LAYOUT = {"tiny-hunyuan-dit": "hydit", "tiny-hunyuan-dit-v1.1": "comfy"}
U2, R2, U4 = dict(ulysses_degree=2), dict(ring_degree=2), dict(ulysses_degree=4)
U2R2, CFG2, DP2 = dict(ulysses_degree=2, ring_degree=2), dict(cfg_degree=2), dict(dp_degree=2)
# name -> (degrees, text names, batch, latent h/w, guided)
LAYOUTS = {
    2: {"ulysses2": (U2, tuple(TEXTS), 1, HW, False), "ulysses2_odd": (U2, ("long",), 1, ODD, False),
        "ring2": (R2, tuple(TEXTS), 1, HW, False), "cfg2": (CFG2, ("own",), 1, ODD, True),
        "dp2": (DP2, ("long",), 2, HW, False)},
    4: {"ulysses4": (U4, tuple(TEXTS), 1, HW, False), "ulysses2_ring2": (U2R2, ("own",), 1, HW, True)},
}


def _cond(config, batch, text, g, meta=None):
    bert, t5, real = text
    return hunyuan_dit_cond(config, batch, g, bert_len=bert, t5_len=t5, real=real, meta=meta)


def _inputs(seed: int, text: str, config: dict, batch: int, hw: tuple) -> dict:
    g = torch.Generator().manual_seed(seed + len(text) + 100 * batch + sum(hw))
    shape = (batch, 4, *hw)
    return dict(positive=_cond(config, batch, TEXTS[text], g, meta=(768, 1024, 768, 1024, 0, 0)),
                negative=_cond(config, batch, NEG, g),
                latent=torch.randn(*shape, generator=g), sigma=float(torch.rand((), generator=g)) * 20 + 0.05,
                noise_seed=int(torch.randint(0, 2**31, (), generator=g)))


def _run(model, inp: dict, guided: bool) -> dict:
    out = {"forward": model.denoiser(inp["positive"], tuple(inp["latent"].shape))(inp["latent"], inp["sigma"])}
    out["denoise"] = sample(model, inp["positive"], torch.zeros_like(inp["latent"]), seed=inp["noise_seed"],
                            steps=STEPS, cfg=CFG if guided else 1.0, negative=inp["negative"] if guided else None)
    return out


def _rank_main(rank: int, world_size: int, paths: dict, seed: int, configs: dict):
    results = {}
    for name, (degrees, texts, batch, hw, guided) in LAYOUTS[world_size].items():
        mesh = build_mesh(ParallelConfig(**degrees), "cpu")
        for preset, path in paths.items():
            model = DiTModel.load(path, dtype=torch.float32, mesh=mesh)
            for text in texts:
                for kind, x in _run(model, _inputs(seed, text, configs[preset], batch, hw), guided).items():
                    results[(name, preset, kind, text)] = x
    if world_size == 2:  # PipeFusion's stages would split the skip pairs: refused
        model = DiTModel.load(paths["tiny-hunyuan-dit"], dtype=torch.float32,
                              mesh=build_mesh(ParallelConfig(pipefusion_degree=2), "cpu"))
        try:
            PipeFusionModel(model, PipeFusionOptions(num_pipeline_patch=3, warmup_steps=1))
        except ValueError as e:
            results["pipefusion"] = str(e)
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("hunyuan_dit")
    made = {p: tiny_hunyuan_dit_checkpoint(d, p, seed=SEED % 1000, layout=LAYOUT[p]) for p in TINY_PRESETS}
    return {p: path for p, (path, _) in made.items()}, {p: dict(m.config) for p, (_, m) in made.items()}


@pytest.fixture(scope="module")
def reference(checkpoints):
    paths, configs = checkpoints
    needed = {(t, batch, guided, hw) for layouts in LAYOUTS.values()
              for _, texts, batch, hw, guided in layouts.values() for t in texts}
    out = {}
    for preset, path in paths.items():
        model = DiTModel.load(path, dtype=torch.float32)
        for text, batch, guided, hw in sorted(needed):
            for kind, x in _run(model, _inputs(SEED, text, configs[preset], batch, hw), guided).items():
                out[(preset, kind, text, batch, guided, hw)] = x
    return out


@pytest.fixture(scope="module")
def parallel(checkpoints):
    paths, configs = checkpoints
    return spmd_per_world_size(_rank_main, paths, SEED, configs)


CASES = [(ws, name, preset, kind, t) for ws, layouts in LAYOUTS.items()
         for name, (_, texts, _, _, _) in layouts.items()
         for preset in TINY_PRESETS for kind in ("forward", "denoise") for t in texts]


@pytest.mark.parametrize("world_size,name,preset,kind,text", CASES,
                         ids=[f"ws{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}" for c in CASES])
def test_parallel_matches_single_process(parallel, reference, world_size, name, preset, kind, text):
    _, _, batch, hw, guided = LAYOUTS[world_size][name]
    expected = reference[(preset, kind, text, batch, guided, hw)]
    for rank, results in enumerate(parallel(world_size)):
        got = results[(name, preset, kind, text)]
        assert got.shape == expected.shape == (batch, 4, *hw)
        err = rel_err(got, expected)
        assert err <= TOL, f"seed {SEED}: rank {rank} {name} {preset} {kind} text {text}: rel err {err:.2e}"


def test_pipefusion_is_refused(parallel):
    for results in parallel(2):
        assert "PipeFusion cannot run HunyuanDiT" in results["pipefusion"]


def test_reference_is_not_trivial(reference, checkpoints):
    """Finite, non-constant results, and the text matters: another prompt moves the denoised latent."""
    for key, x in reference.items():
        assert torch.isfinite(x).all() and x.std() > 0.05, key
    paths, configs = checkpoints
    for preset, path in paths.items():
        model = DiTModel.load(path, dtype=torch.float32)
        inp = _inputs(SEED, "own", configs[preset], 1, HW)
        other = dict(inp["positive"], context=torch.randn_like(inp["positive"]["context"]))
        a = model.denoiser(inp["positive"], (1, 4, *HW))(inp["latent"], inp["sigma"])
        b = model.denoiser(other, (1, 4, *HW))(inp["latent"], inp["sigma"])
        assert rel_err(a, b) > 1e-3, preset
