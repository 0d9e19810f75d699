"""CFG-parallel and data-parallel sampling (composed with USP) on real gloo processes vs a single-process run;
and the stepwise path's model calls (a ComfyUI sampler's batch of rows spread over the cfg and dp groups).

One process group per world size runs every layout and case; the reference is sample() on the
same checkpoint without a mesh. Fresh random inputs each run (the seed is in every failure message).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.mesh import build_mesh
from comfy_xdit.models.flux import FluxModel, flux_conditioning
from comfy_xdit.sampling import batch_split, sample
from comfy_xdit.stepwise import forward_rows, share_rows
from tests.flux_tiny import rel_err, spmd_per_world_size, tiny_checkpoint

TOL = 1e-4
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))  # TEST_SEED reproduces a failure
LATENT_HW = (4, 6)  # 2 x 3 = 6 image tokens: splits over sequence degree 2
STEPS = 3
GUIDANCE = 3.5  # both branches

# name: latent batch, context/pooled/negative batches (0: no negative), cfg, extra sample() arguments
CASES = {
    "b1-cfg": dict(batch=1, ctx=1, pooled=1, neg=1, cfg=3.0),
    "b1-cfg1": dict(batch=1, ctx=1, pooled=1, neg=1, cfg=1.0, inputs="b1-cfg"),  # one branch: cfg ranks both run it
    "b3-cfg-mask": dict(batch=3, ctx=3, pooled=1, neg=3, cfg=3.0, mask=True, denoise=0.8),
    "b1": dict(batch=1, ctx=1, pooled=1),  # dp 2: one group has no items
    "b2": dict(batch=2, ctx=2, pooled=1),
    "b3": dict(batch=3, ctx=1, pooled=3, sampler_name="dpmpp_2m"),
    "b3-mask": dict(batch=3, ctx=3, pooled=3, mask=True),
    "b2-index": dict(batch=2, ctx=1, pooled=1, batch_index=[4, 1]),
}
LAYOUTS = {
    2: [(dict(cfg_degree=2), ["b1-cfg", "b1-cfg1", "b3-cfg-mask"]),
        (dict(dp_degree=2), ["b1", "b2", "b3", "b3-mask", "b2-index", "b3-cfg-mask"])],
    4: [(dict(cfg_degree=2, ulysses_degree=2), ["b1-cfg", "b3-cfg-mask"]),
        (dict(dp_degree=2, ring_degree=2), ["b3", "b3-mask", "b2-index"]),
        (dict(dp_degree=2, cfg_degree=2), ["b1-cfg", "b3-cfg-mask", "b2"])],
}


STEPWISE_ROWS = (1, 2, 3, 5)  # rows of one model call: fewer than, as many as and more than the batch groups


def _stepwise_inputs(seed: int, rows: int, config: dict) -> tuple:
    """x, sigma and a conditioning dict of `rows` rows, each row its own (as ComfyUI's cond + uncond chunks)."""
    g = torch.Generator().manual_seed(seed + 7919 * rows)
    h, w = LATENT_HW
    cond = dict(context=torch.randn(rows, 8, config["joint_attention_dim"], generator=g),
                pooled=torch.randn(rows, config["pooled_projection_dim"], generator=g),
                guidance=torch.rand(rows, generator=g) * 5)
    return torch.randn(rows, 16, h, w, generator=g), torch.rand(rows, generator=g), cond


def _key(layout: dict) -> str:
    return "x".join(f"{k.split('_')[0]}{v}" for k, v in layout.items())


def _inputs(seed: int, name: str, config: dict) -> dict:
    case = CASES[name]
    g = torch.Generator().manual_seed(seed + sum(map(ord, case.get("inputs", name))))
    b, (h, w) = case["batch"], LATENT_HW
    dim, pdim = config["joint_attention_dim"], config["pooled_projection_dim"]
    kw = dict(cfg=case.get("cfg", 1.0), seed=int(torch.randint(0, 2**31, (), generator=g)))
    kw.update({k: case[k] for k in ("batch_index", "sampler_name", "denoise") if k in case})
    if case.get("neg"):
        kw["negative"] = flux_conditioning(torch.randn(case["neg"], 7, dim, generator=g),
                                           torch.randn(case["neg"], pdim, generator=g), GUIDANCE)
    latent = torch.zeros(b, 16, h, w)
    if case.get("mask"):  # per-item masks keep part of a real latent
        latent = torch.randn(b, 16, h, w, generator=g)
        kw["noise_mask"] = (torch.rand(b, h, w, generator=g) > 0.4).float()
    return dict(context=torch.randn(case["ctx"], 8, dim, generator=g),
                pooled=torch.randn(case["pooled"], pdim, generator=g), latent=latent, kw=kw)


def _sample(model: FluxModel, inp: dict, callback=None) -> torch.Tensor:
    positive = flux_conditioning(inp["context"], inp["pooled"], GUIDANCE)
    return sample(model, positive, inp["latent"], steps=STEPS, callback=callback, **inp["kw"])


def _rank_main(rank: int, world_size: int, path: str, seed: int, config: dict):
    results = {}
    for layout, names in LAYOUTS[world_size]:
        mesh = build_mesh(ParallelConfig(**layout), "cpu")
        model = FluxModel.load(path, dtype=torch.float32, mesh=mesh)
        for name in names:
            steps = []
            out = _sample(model, _inputs(seed, name, config),
                          callback=lambda i, n, d: steps.append((i, n, d.shape[0])))
            results[(_key(layout), name)] = dict(out=out, steps=steps, dp=(mesh.rank("dp"), mesh.size("dp")))
        for rows in STEPWISE_ROWS:
            with torch.inference_mode():
                results[(_key(layout), f"stepwise-{rows}")] = forward_rows(model, *_stepwise_inputs(seed, rows, config))
        if layout.get("dp_degree", 1) > 1:  # a bad conditioning batch fails on every rank, before any split
            inp = _inputs(seed, "b3", config)
            inp["context"] = inp["context"].repeat(2, 1, 1)
            try:
                _sample(model, inp)
            except ValueError as e:
                results[(_key(layout), "bad-cond")] = str(e)
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, model = tiny_checkpoint(tmp_path_factory.mktemp("cfg_dp"), seed=SEED % 1000)
    return path, dict(model.config)


@pytest.fixture(scope="module")
def reference(checkpoint):
    path, config = checkpoint
    model = FluxModel.load(path, dtype=torch.float32)
    return {name: _sample(model, _inputs(SEED, name, config)) for name in CASES}


@pytest.fixture(scope="module")
def parallel(checkpoint):
    path, config = checkpoint
    return spmd_per_world_size(_rank_main, path, SEED, config)


PARAMS = [(ws, _key(layout), name) for ws, layouts in LAYOUTS.items() for layout, names in layouts for name in names]


@pytest.mark.parametrize("world_size,layout,name", PARAMS, ids=[f"ws{p[0]}-{p[1]}-{p[2]}" for p in PARAMS])
def test_parallel_matches_single_process(parallel, reference, world_size, layout, name):
    expected = reference[name]
    for rank, results in enumerate(parallel(world_size)):
        res = results[(layout, name)]
        assert res["out"].shape == expected.shape, f"rank {rank}: every rank returns the whole batch"
        err = rel_err(res["out"], expected)
        assert err <= TOL, f"seed {SEED}: rank {rank} {layout} {name}: rel err {err:.2e}"
        dp_rank, dp = res["dp"]
        start, stop = batch_split(expected.shape[0], dp)[dp_rank]
        assert res["steps"] == [(i, STEPS, stop - start) for i in range(1, STEPS + 1)], \
            f"rank {rank}: one callback per step, with this dp group's share of the batch"


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_bad_conditioning_batch_fails_like_single_process(parallel, checkpoint, world_size):
    path, config = checkpoint
    inp = _inputs(SEED, "b3", config)
    inp["context"] = inp["context"].repeat(2, 1, 1)
    with pytest.raises(ValueError, match="conditioning batch 2 does not divide latent batch 3") as serial:
        _sample(FluxModel.load(path, dtype=torch.float32), inp)
    for results in parallel(world_size):
        dp_layouts = [_key(layout) for layout, _ in LAYOUTS[world_size] if layout.get("dp_degree", 1) > 1]
        assert [results.get((k, "bad-cond")) for k in dp_layouts] == [str(serial.value)] * len(dp_layouts)


def test_reference_is_not_trivial(reference):
    # A parallel path that dropped the guidance or a batch item would not pass the comparisons above.
    for name, x in reference.items():
        assert torch.isfinite(x).all() and x.std() > 0.05, name
    assert rel_err(reference["b1-cfg"], reference["b1-cfg1"]) > 0.05


def test_batch_split_is_tensor_split():
    for batch in range(6):
        for parts in (1, 2, 3, 4):
            got = [stop - start for start, stop in batch_split(batch, parts)]
            assert got == [len(c) for c in torch.tensor_split(torch.arange(batch), parts)]


@pytest.fixture(scope="module")
def stepwise_reference(checkpoint):
    path, config = checkpoint
    model = FluxModel.load(path, dtype=torch.float32)
    with torch.inference_mode():
        return {rows: model.forward(*_stepwise_inputs(SEED, rows, config)) for rows in STEPWISE_ROWS}


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_stepwise_rows_match_single_process(parallel, stepwise_reference, world_size):
    """One model call of the stepwise path, its rows shared over the cfg and dp groups, equals the whole batch in
    one process on every rank, whether the rows are fewer than, equal to or more than the groups."""
    for rank, results in enumerate(parallel(world_size)):
        for layout, _ in LAYOUTS[world_size]:
            for rows in STEPWISE_ROWS:
                out, expected = results[(_key(layout), f"stepwise-{rows}")], stepwise_reference[rows]
                assert out.shape == expected.shape, f"rank {rank} {_key(layout)}: {rows} rows back"
                err = rel_err(out, expected)
                assert err <= TOL, f"seed {SEED}: rank {rank} {_key(layout)} {rows} rows: rel err {err:.2e}"


def test_share_rows_covers_every_row_once_and_no_group_idles():
    assert share_rows(5, 2) == [(0, 3), (3, 5)]
    assert share_rows(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert share_rows(1, 4) == [(0, 1)] * 4  # a single row: every group runs it (they would idle otherwise)
    assert share_rows(3, 4) == [(0, 1), (1, 2), (2, 3), (0, 1)]
