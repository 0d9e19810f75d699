"""USP (Ulysses, Ring, Ulysses x Ring) on real gloo processes vs a single-process run.

One process group per world size runs every layout and input case; the reference is the
unmodified diffusers model in this process, on the same checkpoint and inputs.
Fresh random inputs each run (the seed is printed on failure through the test id).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.mesh import build_mesh
from comfy_xdit.models.flux import FluxModel, flux_conditioning, image_ids
from comfy_xdit.sampling import sample
from tests.flux_tiny import rel_err, spmd_per_world_size, tiny_checkpoint

TOL = 1e-4
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))  # TEST_SEED reproduces a failure
LATENT_HW = (8, 12)  # non-square: 4 x 6 = 24 image tokens
TEXT_LENS = (8, 7)   # 8 splits over 2 and 4 ranks; 7 never does (replicated joint text)
STEPS = 8
LAYOUTS = {
    2: [dict(ulysses_degree=2), dict(ring_degree=2)],
    4: [dict(ulysses_degree=4), dict(ring_degree=4), dict(ulysses_degree=2, ring_degree=2)],
}


def _inputs(seed: int, text_len: int, config: dict):
    g = torch.Generator().manual_seed(seed + text_len)
    h, w = LATENT_HW
    return dict(
        latent=torch.randn(1, 16, h, w, generator=g),
        context=torch.randn(1, text_len, config["joint_attention_dim"], generator=g),
        pooled=torch.randn(1, config["pooled_projection_dim"], generator=g),
        sigma=float(torch.rand((), generator=g)) * 0.9 + 0.05,
        noise_seed=int(torch.randint(0, 2**31, (), generator=g)),
    )


def _forward(model: FluxModel, inp: dict) -> torch.Tensor:
    denoise = model.denoiser(flux_conditioning(inp["context"], inp["pooled"], 3.5), tuple(inp["latent"].shape))
    return denoise(inp["latent"], inp["sigma"])


def _denoise(model: FluxModel, inp: dict) -> torch.Tensor:
    return sample(model, flux_conditioning(inp["context"], inp["pooled"], 3.5), torch.zeros_like(inp["latent"]),
                  seed=inp["noise_seed"], steps=STEPS)


def _rank_main(rank: int, world_size: int, path: str, seed: int, config: dict):
    results = {}
    for layout in LAYOUTS[world_size]:
        mesh = build_mesh(ParallelConfig(**layout), "cpu")
        model = FluxModel.load(path, dtype=torch.float32, mesh=mesh)
        key = "x".join(f"{k.split('_')[0]}{v}" for k, v in layout.items())
        for text_len in TEXT_LENS:
            inp = _inputs(seed, text_len, config)
            results[(key, "forward", text_len)] = _forward(model, inp)
            results[(key, "denoise", text_len)] = _denoise(model, inp)
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("usp"), seed=SEED % 1000)
    return path, dict(model.config)


@pytest.fixture(scope="module")
def reference(checkpoint):
    path, config = checkpoint
    model = FluxModel.load(path, dtype=torch.float32)
    out = {}
    for text_len in TEXT_LENS:
        inp = _inputs(SEED, text_len, config)
        out[("forward", text_len)] = _forward(model, inp)
        out[("denoise", text_len)] = _denoise(model, inp)
    return out


@pytest.fixture(scope="module")
def parallel(checkpoint):
    path, config = checkpoint
    return spmd_per_world_size(_rank_main, path, SEED, config)


CASES = [(ws, "x".join(f"{k.split('_')[0]}{v}" for k, v in layout.items()), kind, t)
         for ws, layouts in LAYOUTS.items() for layout in layouts
         for kind in ("forward", "denoise") for t in TEXT_LENS]


@pytest.mark.parametrize("world_size,layout,kind,text_len", CASES,
                         ids=[f"ws{c[0]}-{c[1]}-{c[2]}-text{c[3]}" for c in CASES])
def test_parallel_matches_single_process(parallel, reference, world_size, layout, kind, text_len):
    per_rank = parallel(world_size)
    expected = reference[(kind, text_len)]
    for rank, results in enumerate(per_rank):
        got = results[(layout, kind, text_len)]
        assert got.shape == expected.shape
        err = rel_err(got, expected)
        assert err <= TOL, f"seed {SEED}: rank {rank} {layout} {kind} text {text_len}: rel err {err:.2e}"


def test_reference_is_not_trivial(reference):
    # A parallel path that returned zeros or its input would not pass the comparisons above.
    for (kind, text_len), x in reference.items():
        assert torch.isfinite(x).all() and x.std() > 0.05, (kind, text_len)


def test_image_ids_are_row_major():
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3)
    assert ids[:, 1].tolist() == [0, 0, 0, 1, 1, 1] and ids[:, 2].tolist() == [0, 1, 2, 0, 1, 2]
