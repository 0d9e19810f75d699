"""fp8 storage and stage-only PipeFusion loading through the pool (2 CPU ranks) against one process."""

from __future__ import annotations

import pytest
import torch

from comfy_xdit.models.flux import FluxModel, flux_conditioning
from comfy_xdit.models.flux.checkpoint import load_flux_transformer
from comfy_xdit.pool.controller import PoolOptions, RequestFailed, WorkerPool
from comfy_xdit.sampling import sample
from tests.flux_tiny import make_tiny_flux, rel_err, write_flux_checkpoint

STEPS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool_memory") / "flux_tiny.safetensors"
    write_flux_checkpoint(make_tiny_flux(seed=5, num_layers=3, num_single_layers=3), path, layout="comfy")
    return str(path)


@pytest.fixture(scope="module")
def pool2():
    pool = WorkerPool(PoolOptions(nproc=2))
    yield pool
    pool.shutdown()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"positive.context": torch.randn(1, 8, 64, generator=g), "positive.pooled": torch.randn(1, 32, generator=g),
            "latent": torch.zeros(1, 16, 8, 12)}


def _positive(inp):
    """The positive conditioning of a request's tensors, as sample() takes it in one process."""
    return flux_conditioning(inp["positive.context"], inp["positive.pooled"])


@pytest.fixture(scope="module")
def reference(checkpoint):
    """One process, fp8 storage computed in bf16: what every layout must reproduce."""
    model = FluxModel(load_flux_transformer(checkpoint, dtype=torch.bfloat16, fp8=True)[0])
    inp = _inputs()
    return sample(model, _positive(inp), inp["latent"], seed=4, steps=STEPS).float()


@pytest.mark.parametrize("parallel,extra", [({"pipefusion_degree": 2}, {"warmup_steps": STEPS}),
                                            ({"ulysses_degree": 2}, {})])
def test_fp8_through_the_pool(pool2, checkpoint, reference, parallel, extra):
    args, _ = pool2.request("load_model", {"path": checkpoint, "dtype": "fp8_e4m3fn", "parallel": parallel, **extra})
    assert "|fp8_e4m3fn|" in args["model_key"]
    _, out = pool2.request("sample", {"model_key": args["model_key"], "seed": 4, "steps": STEPS}, _inputs())
    # measured 0.0 for both on CPU; 1e-3 leaves room for bf16 rounding in other attention kernels
    assert rel_err(out["samples"], reference) <= 1e-3


def test_fp8_is_refused_for_the_vae(pool2, checkpoint):
    with pytest.raises(RequestFailed, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\]"):
        pool2.request("load_model", {"kind": "vae", "path": checkpoint, "dtype": "fp8_e4m3fn"})


def test_explicit_stage_split_through_the_pool(pool2, checkpoint):
    """stage_blocks puts 1 of the 6 blocks on the first stage and 5 on the second; synchronous steps: exact."""
    load = {"path": checkpoint, "dtype": "fp32", "parallel": {"pipefusion_degree": 2}, "warmup_steps": STEPS}
    args, _ = pool2.request("load_model", {**load, "stage_blocks": [1, 5]})
    assert "stages=[1, 5]" in args["model_key"]
    _, out = pool2.request("sample", {"model_key": args["model_key"], "seed": 4, "steps": STEPS}, _inputs())
    inp = _inputs()
    reference = sample(FluxModel.load(checkpoint, dtype=torch.float32), _positive(inp), inp["latent"],
                       seed=4, steps=STEPS)
    assert rel_err(out["samples"], reference) <= 1e-4
    with pytest.raises(RequestFailed, match=r"stage_blocks \(3, 2\) must give each of the 2 stages at least one "
                                            r"block and add up to the model's 6 blocks"):
        pool2.request("load_model", {**load, "stage_blocks": [3, 2]})
    with pytest.raises(RequestFailed, match="stage_blocks must be a list of block counts"):
        pool2.request("load_model", {**load, "stage_blocks": 6})
    assert pool2.alive
