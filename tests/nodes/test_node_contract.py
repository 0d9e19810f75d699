"""Every node's declaration against the rules ComfyUI applies when it registers and validates nodes."""

from __future__ import annotations

import os

import pytest
import torch

import fake_comfy

ALLOWED_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "CONDITIONING", "LATENT", "IMAGE", "MODEL", "XDIT_MODEL", "XDIT_VAE",
                 "XDIT_CONTROLNET"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    for sub, name in (("diffusion_models", "flux_a.safetensors"), ("unet", "flux_b.safetensors"),
                      ("loras", "style.safetensors"), ("vae", "ae.safetensors"),
                      ("controlnet", "canny.safetensors")):
        os.makedirs(models / sub, exist_ok=True)
        (models / sub / name).write_bytes(b"")
    fake_comfy.install(str(models))
    yield fake_comfy.load_pack()
    fake_comfy.uninstall()


def _check_input(node, name, spec):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node, name)
    kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
    assert isinstance(options, dict), (node, name)
    if isinstance(kind, list):  # a combo: every default must be one of its values
        assert all(isinstance(v, str) for v in kind), (node, name)
        if "default" in options:
            assert options["default"] in kind, (node, name)
        return
    assert kind in ALLOWED_TYPES, (node, name, kind)
    if kind in ("INT", "FLOAT"):
        lo, hi = options.get("min", float("-inf")), options.get("max", float("inf"))
        assert lo <= options.get("default", lo) <= hi, (node, name)
        if kind == "INT":
            assert all(isinstance(options[k], int) for k in ("default", "min", "max") if k in options), (node, name)


def test_every_node_is_well_formed(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"} and "required" in inputs, name
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                _check_input(name, input_name, spec)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(t in ALLOWED_TYPES for t in cls.RETURN_TYPES), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert cls.CATEGORY == "xDiT" and cls.DESCRIPTION, name
        # the node function takes exactly the declared inputs (ComfyUI passes them by name)
        import inspect
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        declared = set(inputs["required"]) | set(inputs.get("optional", {}))
        assert set(params) - {"self"} == declared, name
        optional = set(inputs.get("optional", {}))
        assert all(params[p].default is not inspect.Parameter.empty for p in optional), name


def test_combo_lists_come_from_the_model_folders(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    assert nodes["XDiTModelLoader"].INPUT_TYPES()["required"]["unet_name"][0] == ["flux_a.safetensors",
                                                                                  "flux_b.safetensors"]
    assert nodes["XDiTLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0] == ["style.safetensors"]
    assert nodes["XDiTVAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["ae.safetensors"]
    assert nodes["XDiTControlNetLoader"].INPUT_TYPES()["required"]["control_net_name"][0] == ["canny.safetensors"]
    sampler = nodes["XDiTSampler"].INPUT_TYPES()["required"]
    assert {"euler", "dpmpp_2m"} <= set(sampler["sampler_name"][0])
    assert {"simple", "normal", "sgm_uniform", "beta"} <= set(sampler["scheduler"][0])


def test_lora_loader_chains_without_touching_the_pool(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    client = pack.nodes.ModelHandle
    base = client(path="/m/flux.safetensors", gpus=2)
    (one,) = nodes["XDiTLoraLoader"]().apply(base, "style.safetensors", 0.8)
    (two,) = nodes["XDiTLoraLoader"]().apply(one, "style.safetensors", -0.5)
    assert base.loras == () and [s for _, s in two.loras] == [0.8, -0.5]
    assert two.path == base.path and hash(two) != hash(one)


def test_manual_strategy_must_multiply_to_the_gpu_count(pack):
    with pytest.raises(ValueError, match=r"ulysses_degree 2 x ring_degree 2 = 4, but 2 GPUs were asked for"):
        pack.nodes._parallel("manual", 2, 2, 2)
    assert dict(pack.nodes._parallel("manual", 4, 2, 2)) == {"ring_degree": 2, "ulysses_degree": 2,
                                                             "cfg_degree": 1, "dp_degree": 1}
    assert dict(pack.nodes._parallel("manual", 8, 2, 1, 2, 2)) == {"ring_degree": 1, "ulysses_degree": 2,
                                                                   "cfg_degree": 2, "dp_degree": 2}
    assert pack.nodes._parallel("auto", 4, 1, 1) == ()
    assert dict(pack.nodes._parallel("cfg_parallel", 4, 1, 1)) == {"cfg_degree": 2, "ulysses_degree": 2}
    assert dict(pack.nodes._parallel("data_parallel", 2, 1, 1)) == {"dp_degree": 2}
    assert dict(pack.nodes._parallel("manual", 8, 2, 1, 2, 1, 2)) == {"ring_degree": 1, "ulysses_degree": 2,
                                                                      "cfg_degree": 2, "dp_degree": 1,
                                                                      "pipefusion_degree": 2}
    with pytest.raises(ValueError, match=r"pipefusion_degree 2 x ulysses_degree 2 x ring_degree 1 = 4, but 2 GPUs"):
        pack.nodes._parallel("manual", 2, 2, 1, 1, 1, 2)
    with pytest.raises(ValueError, match="cfg_parallel needs an even number of GPUs, got 3"):
        pack.nodes._parallel("cfg_parallel", 3, 1, 1)


def test_missing_file_and_bad_conditioning_fail_clearly(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        nodes["XDiTModelLoader"]().load("missing.safetensors", "bf16", 1, "auto")
    with pytest.raises(ValueError, match="is empty"):
        pack.nodes._conditioning([], "positive")
    with pytest.raises(ValueError, match="takes a single entry"):
        pack.nodes._conditioning([[1, {"pooled_output": 1}], [2, {"pooled_output": 2}]], "positive")
    # no pooled output (Wan has none): the workers say whether the model needs one; I2V tensors ride along
    vision = type("Vision", (), {"penultimate_hidden_states": torch.ones(1, 257, 8)})()
    cond = pack.nodes._conditioning([[torch.zeros(1, 5, 8), {"clip_vision_output": vision,
                                                              "concat_mask": torch.ones(1, 1, 2, 4, 4)}]], "negative")
    assert cond.pooled is None and set(cond.tensors("negative")) == {"negative.context", "negative.clip_fea",
                                                                    "negative.concat_mask"}


WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def _widget_inputs(cls) -> list:
    """(name, kind, options) of the inputs the frontend shows as widgets, in widgets_values' order."""
    inputs = cls.INPUT_TYPES()
    specs = list(inputs["required"].items()) + list(inputs.get("optional", {}).items())
    return [(name, spec[0], spec[1] if len(spec) > 1 else {}) for name, spec in specs
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES]


def test_example_workflows_fit_the_nodes(pack):
    """Saved workflows stay valid as inputs are added: widget values by position (UI format), by name (API)."""
    import glob
    import json

    folder = os.path.join(fake_comfy.REPO_ROOT, "example_workflows")
    nodes = pack.NODE_CLASS_MAPPINGS
    checked = 0
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            for node in json.load(f)["nodes"]:
                if node["type"] not in nodes:
                    continue
                widgets = _widget_inputs(nodes[node["type"]])
                values = list(node["widgets_values"])
                for i, (_, _, options) in enumerate(widgets):  # drop the "fixed"/"randomize" after a seed
                    if i < len(values) and options.get("control_after_generate"):
                        del values[i + 1]
                assert len(values) <= len(widgets), (path, node["type"])
                for value, (name, kind, _) in zip(values, widgets):
                    kind = str if isinstance(kind, list) else WIDGET_TYPES[kind]
                    assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
                        (path, node["type"], name, value)
                checked += 1
    for path in glob.glob(os.path.join(folder, "api", "*.json")):
        with open(path) as f:
            for node in json.load(f).values():
                if node["class_type"] not in nodes:
                    continue
                inputs = nodes[node["class_type"]].INPUT_TYPES()
                assert set(inputs["required"]) <= set(node["inputs"]), (path, node["class_type"])
                assert set(node["inputs"]) <= set(inputs["required"]) | set(inputs.get("optional", {})), path
                checked += 1
    assert checked >= 12


def test_loader_passes_pipefusion_and_compile_options_to_the_workers(pack, monkeypatch):
    loaded = []
    monkeypatch.setattr(pack.nodes.ENGINE, "load", lambda handle, on_progress=None: loaded.append(handle) or {})
    (handle,) = pack.NODE_CLASS_MAPPINGS["XDiTModelLoader"]().load(
        "flux_a.safetensors", "fp8_e4m3fn", 2, "manual", pipefusion_degree=2, num_pipeline_patch=4, warmup_steps=3,
        compile=True)
    assert loaded == [handle]
    args = handle.load_args()
    assert args["parallel"]["pipefusion_degree"] == 2 and args["dtype"] == "fp8_e4m3fn"
    assert (args["num_pipeline_patch"], args["warmup_steps"], args["compile"]) == (4, 3, True)


def test_model_sampling_nodes_set_the_shift_as_comfyuis_do(pack):
    from comfy_xdit.client import ModelHandle

    nodes, handle = pack.NODE_CLASS_MAPPINGS, ModelHandle(path="model.safetensors")
    (flux,) = nodes["XDiTModelSamplingFlux"]().patch(handle, 1.15, 0.5, 128, 128)
    (sd3,) = nodes["XDiTModelSamplingSD3"]().patch(handle, 6.0)
    assert flux.shift == 0.46749999999999997 and sd3.shift == 6.0 and handle.shift is None  # ComfyUI's values
    assert flux.load_args() == handle.load_args()  # the shift is a sampling setting: the model is not reloaded
