"""The loaders' gpu_ids, and the room the nodes ask ComfyUI to make on the GPUs it shares with the pool.

A stand-in pool plays two CUDA workers (it answers status with each rank's reserved memory, and
sample/decode/encode with the peak each rank allocated); the fake comfy.model_management records
what the nodes ask of it. The amounts are computed here from the rule in comfy_xdit/client.py:
the job's last peak on that GPU (else the estimate), less what the worker there holds, plus the reserve.
"""

from __future__ import annotations

import importlib
import os
import types

import pytest
import torch

import fake_comfy
from comfy_xdit.vae.parallel import estimate_decode_bytes

GIB = 2 ** 30
MODEL_BYTES, VAE_BYTES = 3 * 2 ** 20, 2 ** 20


class CudaPool:
    """Shaped like WorkerPool as far as the engine uses it: two (or more) CUDA ranks, nothing started."""

    created: list = []

    def __init__(self, options):
        self.options = options
        self.alive = True
        self.requests: list[str] = []
        self.reserved = [GIB * (r + 1) for r in range(options.nproc)]  # what each worker holds now
        self.peaks = [GIB * (5 + 2 * r) for r in range(options.nproc)]  # what each job allocates at most
        CudaPool.created.append(self)

    def request(self, kind, args=None, tensors=None, **_):
        self.requests.append(kind)
        ranks = [dict(rank=r, device=f"cuda:{r}", memory_reserved=held) for r, held in enumerate(self.reserved)]
        if kind == "status":
            return dict(world_size=self.options.nproc, device=self.options.device, ranks=ranks), {}
        if kind == "load_model":
            return {"model_key": args["path"]}, {}
        if kind == "sample":
            return {"peak_memory": list(self.peaks)}, {"samples": tensors["latent"]}
        if kind == "decode":
            b, _, h, w = tensors["samples"].shape
            return {"peak_memory": list(self.peaks)}, {"images": torch.zeros(b, h * 8, w * 8, 3)}
        if kind == "encode":
            b, h, w, _ = tensors["images"].shape
            return {"peak_memory": list(self.peaks)}, {"samples": torch.zeros(b, 16, h // 8, w // 8)}
        raise AssertionError(kind)

    def shutdown(self, timeout: float = 10.0):
        self.alive = False


@pytest.fixture()
def env(tmp_path, monkeypatch):
    for sub, name, size in (("diffusion_models", "flux.safetensors", MODEL_BYTES), ("vae", "ae.safetensors", VAE_BYTES)):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / name).write_bytes(b"\0" * size)
    state = fake_comfy.install(str(tmp_path))
    pack = fake_comfy.load_pack()
    client = importlib.import_module(pack.nodes.Engine.__module__)  # the pack's own copy of comfy_xdit.client
    devices = types.SimpleNamespace(kind="cuda", count=4)
    monkeypatch.setattr(client, "available_devices", lambda: (devices.kind, devices.count))
    monkeypatch.setattr(client, "WorkerPool", CudaPool)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    CudaPool.created = []
    yield pack, state, devices, client
    pack.nodes.ENGINE.shutdown()
    fake_comfy.uninstall()


def _conditioning():
    return [[torch.zeros(1, 4, 64), {"pooled_output": torch.zeros(1, 32), "guidance": 3.5}]]


def _sample(pack, model, latent):
    (out,) = pack.NODE_CLASS_MAPPINGS["XDiTSampler"]().sample(model, _conditioning(), _conditioning(), latent, 0, 2,
                                                             1.0, "euler", "simple", 1.0)
    return out


def _freed(state):
    """(GPU index, bytes asked) per free_memory call since the last look; soft_empty_cache as "empty"."""
    calls, state.memory_calls[:] = list(state.memory_calls), []
    return [("empty",) if c[0] == "soft_empty_cache" else (c[2].index, c[1]) for c in calls]


def test_sampler_asks_comfyui_for_room_on_each_shared_gpu(env):
    pack, state, _, client = env
    nodes, reserve, per_image = pack.NODE_CLASS_MAPPINGS, client.ROOM_RESERVE, client.ACTIVATIONS_PER_MEGAPIXEL
    assert reserve == GIB and per_image == 3 * GIB
    state.torch_device, state.loaded_devices = torch.device("cuda", 0), [torch.device("cuda", 1)]

    (model,) = nodes["XDiTModelLoader"]().load("flux.safetensors", "bf16", 2, "auto", gpu_ids="0,1")
    assert [(p.options.nproc, p.options.device, p.options.gpus) for p in CudaPool.created] == [(2, "cuda", [0, 1])]
    # no pool yet: the whole file on each GPU
    assert _freed(state) == [(0, MODEL_BYTES + reserve), (1, MODEL_BYTES + reserve), ("empty",)]

    latent = {"samples": torch.zeros(1, 16, 128, 128)}  # 1024x1024
    _sample(pack, model, latent)
    # no peak yet: file + 3 GiB per 1024x1024 image, less what each worker holds (1 and 2 GiB)
    estimate = MODEL_BYTES + per_image
    assert _freed(state) == [(0, estimate - GIB + reserve), (1, estimate - 2 * GIB + reserve), ("empty",)]
    _sample(pack, model, latent)
    # the peaks the first run reported (5 and 7 GiB), less what each worker holds
    assert _freed(state) == [(0, 4 * GIB + reserve), (1, 5 * GIB + reserve), ("empty",)]
    # another size: its own estimate again (file + 0.75 GiB), below what each worker holds: the reserve alone
    _sample(pack, model, {"samples": torch.zeros(1, 16, 64, 64)})
    assert MODEL_BYTES + per_image // 4 < GIB and _freed(state) == [(0, reserve), (1, reserve), ("empty",)]
    assert CudaPool.created[0].requests.count("sample") == 3 and len(CudaPool.created) == 1


def test_only_the_gpus_comfyui_uses_are_asked_in_comfyuis_numbering(env, monkeypatch):
    pack, state, _, client = env
    reserve = client.ROOM_RESERVE
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # ComfyUI's cuda:i is physical GPU 4 + i
    state.torch_device = torch.device("cuda", 0)
    (model,) = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]().load("flux.safetensors", "bf16", 2, "auto",
                                                                  gpu_ids="2, 0")
    assert CudaPool.created[0].options.gpus == [6, 4]  # the workers' CUDA_VISIBLE_DEVICES, rank order
    _freed(state)
    _sample(pack, model, {"samples": torch.zeros(1, 16, 128, 128)})
    _freed(state)
    _sample(pack, model, {"samples": torch.zeros(1, 16, 128, 128)})
    # cuda:0 runs rank 1: its peak (7 GiB) less what it holds (2 GiB); cuda:2 is not ComfyUI's
    assert _freed(state) == [(0, 5 * GIB + reserve), ("empty",)]
    state.torch_device = torch.device("cuda", 3)
    _sample(pack, model, {"samples": torch.zeros(1, 16, 128, 128)})
    assert _freed(state) == []  # ComfyUI on another GPU: nothing to ask


def test_vae_decode_and_encode_ask_for_room(env):
    pack, state, _, client = env
    nodes, reserve = pack.NODE_CLASS_MAPPINGS, client.ROOM_RESERVE
    state.torch_device = torch.device("cuda", 1)
    (vae,) = nodes["XDiTVAELoader"]().load("ae.safetensors", 2, gpu_ids="0,1")
    assert _freed(state) == [(1, VAE_BYTES + reserve), ("empty",)]
    latent = {"samples": torch.zeros(1, 16, 128, 128)}
    nodes["XDiTVAEDecode"]().decode(latent, vae)
    usual_vae = {"block_out_channels": [128, 256, 512, 512]}
    first = max(0, VAE_BYTES + estimate_decode_bytes(usual_vae, (1, 16, 128, 128), 2, torch.float32) - 2 * GIB)
    assert first > 0 and _freed(state) == [(1, first + reserve), ("empty",)]
    nodes["XDiTVAEDecode"]().decode(latent, vae)
    assert _freed(state) == [(1, 5 * GIB + reserve), ("empty",)]
    (encoded,) = nodes["XDiTVAEEncode"]().encode(torch.zeros(1, 1024, 1024, 3), vae)
    assert encoded["samples"].shape == (1, 16, 128, 128)
    assert _freed(state) == [(1, first + reserve), ("empty",)]  # the latent it becomes sizes it
    nodes["XDiTVAEEncode"]().encode(torch.zeros(1, 1024, 1024, 3), vae)
    assert _freed(state) == [(1, 5 * GIB + reserve), ("empty",)]


def test_cpu_pools_ask_comfyui_for_nothing(env):
    pack, state, devices, _ = env
    devices.kind = "cpu"
    state.torch_device = torch.device("cuda", 0)  # even where ComfyUI itself has a GPU
    (model,) = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]().load("flux.safetensors", "bf16", 2, "auto")
    _sample(pack, model, {"samples": torch.zeros(1, 16, 128, 128)})
    assert state.memory_calls == [] and CudaPool.created[0].options.gpus is None
    assert CudaPool.created[0].requests == ["load_model", "load_model", "sample"]  # no status round trips


def test_gpu_ids_parsing_and_errors(env):
    pack, _, _, _ = env
    loader = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]()
    assert pack.nodes._gpu_ids("") == () and pack.nodes._gpu_ids(" 1, 3 ") == (1, 3) and pack.nodes._gpu_ids("2 0") == (2, 0)
    with pytest.raises(ValueError, match=r"gpu_ids '0;1': write GPU numbers separated by commas, e\.g\. 0,1"):
        loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="0;1")
    with pytest.raises(ValueError, match=r"gpu_ids 1 names 1 GPU\(s\) but gpus is 2: list 2, or leave gpu_ids "
                                         r"empty for GPUs 0 to 1"):
        loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="1")
    with pytest.raises(ValueError, match="gpu_ids 1,1 names GPU 1 twice; each GPU runs one worker"):
        loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="1,1")
    with pytest.raises(ValueError, match="gpu_ids 0,4: there is no GPU 4; 4 GPUs are available, numbered 0 to 3"):
        pack.NODE_CLASS_MAPPINGS["XDiTVAELoader"]().load("ae.safetensors", 2, gpu_ids="0,4")
    assert CudaPool.created == []  # refused before any pool started


def test_the_pool_restarts_when_the_gpu_set_changes(env):
    pack, _, _, _ = env
    loader = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]()
    loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="0,1")
    loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="1,0")  # the same GPUs: kept
    loader.load("flux.safetensors", "bf16", 2, "auto")  # empty = 0,1: kept
    assert len(CudaPool.created) == 1
    loader.load("flux.safetensors", "bf16", 2, "auto", gpu_ids="2,3")
    loader.load("flux.safetensors", "bf16", 3, "auto", gpu_ids="3,2,1")
    assert [p.options.gpus for p in CudaPool.created] == [[0, 1], [2, 3], [3, 2, 1]]
    assert [p.alive for p in CudaPool.created] == [False, False, True]


def test_first_estimate_comes_from_the_checkpoint_header(env, tmp_path):
    """A readable Flux file is sized by memory.py from its header: fp8 storage and PipeFusion stages count."""
    from comfy_xdit.config import ParallelConfig
    from comfy_xdit.memory import estimate_memory
    from comfy_xdit.models.flux import FLUX
    from comfy_xdit.models.flux.checkpoint import read_flux_info
    from tests.flux_tiny import tiny_checkpoint

    pack, state, _, client = env
    path, _ = tiny_checkpoint(tmp_path / "diffusion_models", seed=1)
    state.torch_device = torch.device("cuda", 0)
    (model,) = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]().load(os.path.basename(path), "fp8_e4m3fn", 2,
                                                                  "pipefusion")
    config, layout = read_flux_info(path).config, ParallelConfig(pipefusion_degree=2)
    weights = max(e.weights for e in estimate_memory(FLUX, config, layout, "fp8_e4m3fn"))
    assert weights < os.path.getsize(path) // 2  # fp8 and half the blocks: well under the file-size rule
    assert _freed(state) == [(0, weights + client.ROOM_RESERVE), ("empty",)]
    CudaPool.created[0].reserved = [0, 0]  # the tiny model's needs would vanish under the stand-in's 1 GiB
    _sample(pack, model, {"samples": torch.zeros(2, 16, 32, 32)})  # two 256x256 images
    stage = max(estimate_memory(FLUX, config, layout, "fp8_e4m3fn", (256, 256)), key=lambda e: e.total)
    assert stage.activations > 0
    assert _freed(state) == [(0, stage.weights + 2 * stage.activations + client.ROOM_RESERVE), ("empty",)]
