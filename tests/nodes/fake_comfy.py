"""The few ComfyUI modules nodes.py imports, stood in for by small fakes, and a loader that
imports the pack the way ComfyUI does (its folder as a package, by path)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InterruptProcessingException(Exception):
    pass


def install(models_dir: str) -> types.SimpleNamespace:
    """Register fake folder_paths / comfy.utils / comfy.model_management over `models_dir`.

    The model management side is ComfyUI on a CPU-only machine unless a test says otherwise:
    state.torch_device is its main device, state.loaded_devices the load devices of its loaded
    models; state.memory_calls records free_memory(bytes, device) and soft_empty_cache() calls."""
    state = types.SimpleNamespace(interrupted=False, progress=[], models_dir=models_dir,
                                  torch_device=torch.device("cpu"), loaded_devices=[], memory_calls=[])
    folders = {"diffusion_models": ["diffusion_models", "unet"], "loras": ["loras"], "vae": ["vae"],
               "controlnet": ["controlnet"]}

    folder_paths = types.ModuleType("folder_paths")

    def get_filename_list(name):
        found = []
        for sub in folders[name]:
            d = os.path.join(models_dir, sub)
            if os.path.isdir(d):
                found += sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        return found

    def get_full_path_or_raise(name, filename):
        for sub in folders[name]:
            path = os.path.join(models_dir, sub, filename)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")

    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path_or_raise = get_full_path_or_raise

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.progress.append((value, total or self.total))

    def throw_exception_if_processing_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise InterruptProcessingException()

    def free_memory(memory_required, device, keep_loaded=[]):
        state.memory_calls.append(("free_memory", memory_required, device))
        return []

    def soft_empty_cache(force=False):
        state.memory_calls.append(("soft_empty_cache",))

    def loaded_models(only_currently_used=False):  # ModelPatchers; only their load_device is read
        return [types.SimpleNamespace(load_device=d) for d in state.loaded_devices]

    utils.ProgressBar = ProgressBar
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.free_memory, mm.soft_empty_cache, mm.loaded_models = free_memory, soft_empty_cache, loaded_models
    mm.get_torch_device = lambda: state.torch_device
    mm.InterruptProcessingException = InterruptProcessingException
    comfy.utils, comfy.model_management = utils, mm
    sys.modules.update({"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                        "comfy.model_management": mm})
    return state


def load_pack(name: str = "custom_nodes_x_comfy_xdit"):
    """Import the repository root as ComfyUI imports a custom node folder."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "__init__.py"),
                                                  submodule_search_locations=[REPO_ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def uninstall() -> None:
    for name in [n for n in sys.modules if n in ("folder_paths", "comfy") or n.startswith("comfy.")
                 or n.startswith("custom_nodes_x_")]:
        del sys.modules[name]
