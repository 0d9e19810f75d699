"""The model-family seam: the registry finds a file's family from its keys, refuses unknown files with the
list of known families, and no core module names a family in its code."""

from __future__ import annotations

import io
import pathlib
import re
import tokenize

import pytest
import torch
from safetensors.torch import save_file

from comfy_xdit.models.checkpoint import CheckpointError
from comfy_xdit.models.family import detect_family, family_for_preset, known_families, read_info
from tests.flux_tiny import tiny_checkpoint
from tests.qwen_tiny import tiny_qwen_checkpoint
from tests.sd3_tiny import tiny_sd3_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
# the core, which reaches models only through the registry (DESIGN.md "Model families: one seam")
CORE = ["comfy_xdit/config.py", "comfy_xdit/mesh.py", "comfy_xdit/memory.py", "comfy_xdit/client.py",
        "comfy_xdit/attention", "comfy_xdit/pipefusion", "comfy_xdit/pool", "comfy_xdit/models/dit.py",
        "comfy_xdit/models/family.py", "comfy_xdit/models/blocks.py", "comfy_xdit/models/checkpoint.py",
        "comfy_xdit/models/lora.py", "comfy_xdit/models/joint_attention.py", "worker", "nodes.py",
        "comfy_model.py", "comfy_xdit/stepwise.py"]
FAMILY_WORD = re.compile(r"flux|sd3|sd35|mmdit|qwen|pixart|hunyuan|hydit", re.IGNORECASE)
COMFY_API = {"convert_diffusers_mmdit"}  # ComfyUI's own function names, called by the comfy-facing code


def _code_names(path: pathlib.Path) -> list[tuple[int, str]]:
    """Identifiers and imported module names (not strings or comments: messages may name families)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.NAME and FAMILY_WORD.search(t.string) and t.string not in COMFY_API]


def test_no_core_module_names_a_family():
    files = [p for entry in CORE for p in ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir()
                                           else [ROOT / entry])]
    assert len(files) > 15
    found = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in files for line, name in _code_names(p)]
    assert not found, "core code names a model family:\n" + "\n".join(found)


def test_the_check_finds_a_family_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from comfy_xdit.models.flux import FLUX\nif family is FLUX:\n    pass  # flux\n")
    assert [name for _, name in _code_names(bad)] == ["flux", "FLUX", "FLUX"]


def test_registry_detects_each_family_from_keys_not_names(tmp_path):
    flux, _ = tiny_checkpoint(tmp_path)
    sd3, _ = tiny_sd3_checkpoint(tmp_path, "tiny-sd3.5-medium")
    renamed = tmp_path / "flux_looking_name.safetensors"
    pathlib.Path(sd3).rename(renamed)
    assert detect_family(flux)[0].name == "flux"
    qwen, _ = tiny_qwen_checkpoint(tmp_path)
    pathlib.Path(qwen).rename(tmp_path / "flux1-dev.safetensors")
    family, info = read_info(tmp_path / "flux1-dev.safetensors")
    assert family.name == "qwen" and info.variant == "qwen-image"
    family, info = read_info(renamed)
    assert family.name == "sd3" and info.variant == "sd3.5-medium"


def test_unknown_file_lists_the_known_families(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4), "middle_block.1.weight": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError) as e:
        detect_family(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "an SD/SDXL UNet" in msg
    assert "Known families: Flux.1, HunyuanDiT, PixArt-α / PixArt-Σ, Qwen-Image, SD3 / SD3.5, Wan 2.1 / 2.2" in msg
    assert known_families() == "Flux.1, HunyuanDiT, PixArt-α / PixArt-Σ, Qwen-Image, SD3 / SD3.5, Wan 2.1 / 2.2"


def test_presets_resolve_to_their_family():
    assert family_for_preset("flux-dev").name == "flux" and family_for_preset("sd3.5-large").name == "sd3"
    assert family_for_preset("qwen-image").name == "qwen" and family_for_preset("tiny-qwen-image").name == "qwen"
    with pytest.raises(ValueError, match="unknown random preset 'sdxl'"):
        family_for_preset("sdxl")


def test_auto_prefers_cfg_parallel_for_guided_families():
    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.memory import GB, auto_layout, preferred_layout
    from comfy_xdit.models.flux import FLUX
    from comfy_xdit.models.sd3 import SD3

    sd3, flux = SD3.preset_config("sd3.5-large"), FLUX.preset_config("flux-dev")
    assert preferred_layout(SD3, sd3, 2) == ParallelConfig(cfg_degree=2)
    assert preferred_layout(SD3, sd3, 4) == ParallelConfig(cfg_degree=2, ulysses_degree=2)
    assert preferred_layout(SD3, sd3, 3) == ParallelConfig(ring_degree=3)  # 38 heads: no Ulysses 3
    assert preferred_layout(FLUX, flux, 2) == ParallelConfig(ulysses_degree=2)
    assert auto_layout(SD3, sd3, 2, "bf16", 80 * GB, "cuda:0") == (ParallelConfig(cfg_degree=2), "bf16")
    # 16 GB per GPU does not hold SD3.5 Large's 16.3 GB of bf16 weights: two PipeFusion stages do
    layout, storage = auto_layout(SD3, sd3, 2, "bf16", 16 * GB, "cuda:0")
    assert layout.pipefusion_degree == 2 and storage == "bf16"


def test_size_errors_give_width_then_height_in_pixels_and_latent():
    from comfy_xdit.models.flux import FLUX

    with pytest.raises(ValueError) as e:
        FLUX.check_latent(FLUX.preset_config("tiny"), (1, 16, 7, 12))  # latent height 7, width 12
    assert str(e.value).startswith("a 96x56 px image (width x height; latent 12x7) does not split into 2x2 patches")
