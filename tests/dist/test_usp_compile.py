"""Ulysses attention inside torch.compile: every Flux block traces as ONE graph (fullgraph=True raises on any
break) with the all-to-alls in it, and the compiled forward equals the eager one. aot_eager: the trace is what
is under test, not a C++ compiler."""

from __future__ import annotations

import torch

from comfy_xdit.config import ParallelConfig
from comfy_xdit.mesh import build_mesh
from comfy_xdit.models.flux import FluxModel, flux_conditioning
from comfy_xdit.models.flux.checkpoint import FLUX_BLOCKS
from comfy_xdit.spmd import run_spmd
from tests.flux_tiny import make_tiny_flux, rel_err


def _rank_main(rank: int, world_size: int):
    torch.manual_seed(0)
    transformer = make_tiny_flux(seed=3, num_layers=2, num_single_layers=2)
    model = FluxModel(transformer, build_mesh(ParallelConfig(ulysses_degree=world_size), "cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 12, generator=g)
    context = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    args = (x, torch.tensor([0.5]), flux_conditioning(context, pooled, 3.5))
    with torch.inference_mode():
        eager = model.forward(*args)
        for block in FLUX_BLOCKS.blocks(transformer):
            block.compile(fullgraph=True, backend="aot_eager")
        compiled = model.forward(*args)
    return eager, compiled


def test_ulysses_blocks_compile_whole_and_match_eager():
    for rank, (eager, compiled) in enumerate(run_spmd(2, _rank_main)):
        assert torch.isfinite(eager).all()
        err = rel_err(compiled, eager)
        assert err <= 1e-5, f"rank {rank}: compiled vs eager rel err {err:.2e}"
