"""Tiny random Flux.1 transformers and checkpoint writers, shared by tests."""

from __future__ import annotations

import os

from comfy_xdit.models.flux.checkpoint import write_flux_checkpoint  # noqa: F401  (re-exported for tests)
from comfy_xdit.models.flux.random import flux_config, random_flux


def tiny_flux_config(**overrides) -> dict:
    return flux_config("tiny", **overrides)


def make_tiny_flux(seed=0, **overrides):
    return random_flux(tiny_flux_config(**overrides), seed=seed)


def rel_err(a, b) -> float:
    """Relative error of a against the reference b (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


def tiny_checkpoint(directory, seed=0, layout="bfl", **overrides):
    """Write a tiny random Flux to directory/flux_tiny.safetensors; returns (path, model)."""
    model = make_tiny_flux(seed=seed, **overrides)
    path = os.path.join(directory, "flux_tiny.safetensors")
    write_flux_checkpoint(model, path, layout=layout)
    return path, model


def spmd_per_world_size(fn, *args):
    """get(world_size) -> run_spmd's per-rank results, run once per world size (one spawn each)."""
    from comfy_xdit.spmd import run_spmd

    cache = {}

    def get(world_size):
        if world_size not in cache:
            cache[world_size] = run_spmd(world_size, fn, *args)
        return cache[world_size]

    return get
