"""ComfyUI's scaled fp8 checkpoints (a ``scaled_fp8`` marker, per-Linear ``scale_weight``, ``scale_input``) load
for every family: each weight is the stored fp8 times its scale, exactly, through every family's own key
mapping (Flux's fused qkv rows are split after dequantising; SD3's SAI names; Wan's renaming)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.models.checkpoint import COMFY_PREFIX, read_state_dict, scaled_fp8_keys
from comfy_xdit.models.family import detect_family, read_info
from comfy_xdit.models.flux.checkpoint import bfl_to_diffusers, diffusers_to_bfl
from comfy_xdit.models.fp8 import FP8
from comfy_xdit.models.sd3.checkpoint import _convert, sai_from_diffusers
from tests.flux_tiny import make_tiny_flux
from tests.sd3_tiny import make_tiny_sd3


def _scaled(sd: dict) -> tuple[dict, dict]:
    """(the file's tensors, the dequantised tensors the loader must give): every 2-D weight as fp8 / scale."""
    out, want = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.float().abs().max() / 448.0
            q = (v.float() / scale).to(FP8)
            out[k], out[k[:-len("weight")] + "scale_weight"] = q, scale.reshape(())
            out[k[:-len("weight")] + "scale_input"] = torch.ones(())
            want[k] = q.float() * scale
        else:
            out[k] = want[k] = v.float().contiguous()
    out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out, want


def test_marker_and_scales_are_split_off():
    keys = ["a.weight", "a.scale_weight", "a.scale_input", "b.weight", "model.diffusion_model.scaled_fp8"]
    assert scaled_fp8_keys(keys) == (["a.weight", "b.weight"], {"a.weight": "a.scale_weight"})
    assert scaled_fp8_keys(["a.weight"]) == (["a.weight"], {})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_scaled_fp8_loads_dequantised(tmp_path, family):
    if family == "flux":
        model = make_tiny_flux(seed=3)
        original = diffusers_to_bfl(model.state_dict())
        to_diffusers = lambda sd: bfl_to_diffusers(sd, dict(model.config))  # noqa: E731
    else:
        model = make_tiny_sd3("tiny-sd3.5-medium", seed=3)
        original = sai_from_diffusers(model.state_dict())
        to_diffusers = _convert
    stored, want = _scaled({k: v.clone() for k, v in original.items()})
    path = tmp_path / f"{family}_fp8_scaled.safetensors"
    save_file({COMFY_PREFIX + k: v for k, v in stored.items()}, str(path))
    assert read_state_dict(path)[COMFY_PREFIX + "scaled_fp8"].dtype == FP8
    fam, _ = detect_family(path)
    assert fam.name == family and read_info(path)[1].stored_dtypes == {"float8_e4m3fn", "float32"}
    loaded, _ = fam.load(path, dtype=torch.float32)
    expected = to_diffusers(want)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v.reshape(got[k].shape)), k
