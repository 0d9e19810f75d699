"""Tiny random SD3 / SD3.5 transformers, checkpoint writers and read recording, shared by tests."""

from __future__ import annotations

import contextlib
import os

import torch

import comfy_xdit.models.checkpoint as checkpoint_io
from comfy_xdit.models.sd3.checkpoint import write_sd3_checkpoint  # noqa: F401  (re-exported for tests)
from comfy_xdit.models.sd3.random import random_sd3, sd3_config
from tests.flux_tiny import rel_err  # noqa: F401  (re-exported for tests)

TINY_PRESETS = ("tiny-sd3-medium", "tiny-sd3.5-medium", "tiny-sd3.5-large")
VARIANTS = {"tiny-sd3-medium": "sd3-medium", "tiny-sd3.5-medium": "sd3.5-medium", "tiny-sd3.5-large": "sd3.5-large"}


def make_tiny_sd3(preset="tiny-sd3-medium", seed=0, dtype=torch.float32, **overrides):
    return random_sd3(sd3_config(preset, **overrides), seed=seed, dtype=dtype)


def tiny_sd3_checkpoint(directory, preset="tiny-sd3-medium", seed=0, layout="sai", dtype=None):
    """Write a tiny random SD3 to directory/<preset>-<layout>.safetensors; returns (path, model)."""
    model = make_tiny_sd3(preset, seed=seed)
    path = os.path.join(directory, f"{preset}-{layout}.safetensors")
    write_sd3_checkpoint(model, path, layout=layout, dtype=dtype)
    return path, model


def sd3_inputs(config, seed=123, batch=1, height=12, width=8, text_len=7, dtype=torch.float32) -> dict:
    """Forward kwargs for a latent of height x width (12 x 8: a non-square 6 x 4 token crop of the position
    table), timestep in diffusers' [0, 1000] scale."""
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden_states=torch.randn(batch, config["in_channels"], height, width, generator=g),
             encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=g),
             pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
             timestep=torch.full((batch,), 500.0))
    return {k: v.to(dtype) for k, v in x.items()}


def run_sd3(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


@contextlib.contextmanager
def recording_reads():
    """Inside: every tensor read through checkpoint IO's safe_open lands in the yielded dict, key -> bytes."""
    real, read = checkpoint_io.safe_open, {}

    class Handle:
        def __init__(self, f):
            self.f = f

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            read[key] = t.numel() * t.element_size()
            return t

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real(*args, **kwargs) as f:
            yield Handle(f)

    checkpoint_io.safe_open = recording_open
    try:
        yield read
    finally:
        checkpoint_io.safe_open = real
