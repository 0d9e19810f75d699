"""Fixtures for the tests against a real ComfyUI server (see helpers.py).

- `comfyui_dir`, `comfyui_python`: where ComfyUI and its Python are (COMFYUI_DIR / the ComfyUI the pack sits in /
  ../shared/comfyui; COMFYUI_PYTHON / .venv-comfyui); every test here skips, with the reason, where one is missing
  or that Python cannot import what ComfyUI and the pack need.
- `comfy`: ONE server for the whole session (a ComfyServer: .run(prompt, timeout) -> history entry,
  .latent(entry, node_id), .interrupt(), .get(path)), started on a temporary base directory holding the random
  models of helpers.write_models, a symlink to this checkout in custom_nodes/ and the test-only nodes of
  helpers.write_test_nodes (custom_nodes/cxd_test_nodes: CXDTestLoadConditioning, a CONDITIONING from a tensor
  file, for Qwen-Image, whose 7B text encoder cannot be built tiny). Stopped at the end (SIGTERM, then
  SIGKILL); the session errors if a pool process outlives it. The models (4 GB) are deleted then, unless
  CXD_KEEP_COMFYUI_BASE is set; the server's log stays in the base directory (comfyui.log).
- `models`: {what: file name} of those models.

A new test here takes `comfy` and builds its prompt with helpers.Workflow: common_nodes(wf) adds the text encoder
(CLIPLoader type sd3), a positive and a negative CLIPTextEncode and ComfyUI's UNETLoader of the SD3 file (flux=True:
the Flux file and FluxGuidance; vae=True: VAELoader); xdit_loader(wf, SD3, gpus, strategy) the pack's loader in
fp32; sampler_pair(...) a Sampler (xDiT) and a KSampler with the same settings, each saved by SaveLatent; then
entry = comfy.run(wf) and rel_l2(comfy.latent(entry, a), comfy.latent(entry, b)). Keep in mind:
- ComfyUI answers a prompt it has run before from its cache: change a seed or an input to run it again;
- another rank count restarts the pool (10-20 s on 2 cores): the modules here end on gpus=2 (Ulysses), so later
  tests are cheapest there;
- ComfyUI keeps the outputs of nodes whose inputs did not change since the last prompt (the text encoder, the
  UNETLoader MODELs), so reusing common_nodes costs nothing after the first prompt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.comfyui.helpers import (REPO, ComfyServer, built_by_setup_script, find_comfyui, find_comfyui_python,
                                   write_models, write_test_nodes)

# What ComfyUI 0.3.64 imports at start-up (torchvision: comfy/ldm/cosmos) and what the pack's workers need.
_IMPORTS = "import torch, torchvision, torchsde, einops, aiohttp, transformers, safetensors, av, diffusers, yunchang"


@pytest.fixture(scope="session")
def comfyui_dir() -> str:
    path, how = find_comfyui()
    if path is None:
        pytest.skip(how)
    return path


@pytest.fixture(scope="session")
def comfyui_python() -> str:
    python, how = find_comfyui_python()
    if python is None:
        pytest.skip(how)
    if built_by_setup_script(python):  # checked there already
        return python
    try:
        check = subprocess.run([python, "-W", "ignore", "-c", _IMPORTS], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"ComfyUI's Python {python} ({how}) does not run: {e}")
    if check.returncode:
        last = (check.stderr or check.stdout).strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"ComfyUI's Python {python} ({how}) lacks what ComfyUI needs ({last[0]}); "
                    "run scripts/setup_comfyui.sh")
    return python


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> str:
    """ComfyUI's base directory for the session: models/, input/, output/, user/, custom_nodes/comfy_xdit
    (a symlink to this checkout) and custom_nodes/cxd_test_nodes (test-only nodes)."""
    base = str(tmp_path_factory.mktemp("comfyui_base"))
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/diffusion_models", "models/vae",
                "models/text_encoders", "models/loras"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", "comfy_xdit"))
    write_test_nodes(base)  # before the server starts: ComfyUI imports custom nodes once
    return base


@pytest.fixture(scope="session")
def _server_and_models(comfyui_dir, comfyui_python, comfy_base):
    server = ComfyServer(comfyui_dir, comfyui_python, comfy_base)
    t0 = time.monotonic()
    server.launch()  # ComfyUI imports (about 20 s) while this process writes the models
    try:
        models = write_models(comfy_base)
        t_models = time.monotonic() - t0
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    sys.stderr.write(f"\n[comfyui] models written in {t_models:.1f} s, server up in {time.monotonic() - t0:.1f} s "
                     f"({server.url}, log {server.log_path})\n")
    yield server, models
    left = server.stop()
    if not os.environ.get("CXD_KEEP_COMFYUI_BASE"):  # 4 GB of models; pytest keeps its last temp folders
        shutil.rmtree(os.path.join(comfy_base, "models"), ignore_errors=True)
    if left:
        raise AssertionError(f"processes started by ComfyUI outlived it: {left}\n{server.log_tail(40)}")


@pytest.fixture(scope="session")
def comfy(_server_and_models) -> ComfyServer:
    return _server_and_models[0]


@pytest.fixture(scope="session")
def models(_server_and_models) -> dict:
    return _server_and_models[1]
