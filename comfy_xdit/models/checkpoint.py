"""Single-file checkpoint IO shared by every loader: safetensors header checks, tensor reads (one tensor at a
time, cast on the way, with progress), meta-tensor shapes for config-from-shapes, and the keys' vocabulary.

Family code (models/<family>/), the VAE and the ControlNet loaders build on these; none of them parses a
header itself.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI / SAI full checkpoints keep the diffusion model here
# safetensors dtype tags -> torch dtype names, for the infos' stored_dtypes
ST_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BF16": "bfloat16", "F16": "float16",
             "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8",
             "BOOL": "bool"}


class CheckpointError(ValueError):
    """A file that cannot be loaded as what was asked for; the message names the file."""


def with_path(path, error: CheckpointError) -> CheckpointError:
    """The error with the file's path in front (once)."""
    return error if str(error).startswith(os.fspath(path)) else CheckpointError(f"{os.fspath(path)}: {error}")


def _unreadable(path, why, expected):
    return CheckpointError(f"{path}: not a readable safetensors file ({why}); expected {expected} (.safetensors)")


def read_header(path, expected: str = "a diffusion model checkpoint") -> dict:
    """The safetensors header (without __metadata__), validated so truncation gets a clear message before any
    read. `expected` names what the caller wanted, for the error."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise _unreadable(path, f"header is corrupt: header length {n} exceeds file size {size}", expected)
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except OSError as e:
        raise _unreadable(path, f"cannot open: {e.strerror or e}", expected) from e
    except ValueError as e:  # JSON and UTF-8 decoding errors
        raise _unreadable(path, f"header is corrupt: {e}", expected) from e
    if not isinstance(header, dict):
        raise _unreadable(path, "header is corrupt: not a JSON object", expected)
    header.pop("__metadata__", None)
    if not all(isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= v.keys() for v in header.values()):
        raise _unreadable(path, "header is corrupt: tensor entry without dtype/shape/data_offsets", expected)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise _unreadable(path, f"header is corrupt: bad tensor entry ({e})", expected) from e
    if 8 + n + end > size:
        raise _unreadable(path, f"file is truncated: tensor data needs {8 + n + end} bytes, file has {size}", expected)
    return header


SCALED_FP8 = "scaled_fp8"  # ComfyUI's marker tensor of a scaled-fp8 file (its dtype is the weights' fp8 format)
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def scaled_fp8_keys(keys) -> tuple[list, dict]:
    """(the model's own keys, {weight key: its scale key}) of a file, with ComfyUI's scaled-fp8 extras split off:
    the ``scaled_fp8`` marker, each Linear's ``<module>.scale_weight`` (stored weight * scale = the weight) and
    ``<module>.scale_input`` (for fp8 matmuls; unused when weights are dequantised). A file without them: (keys, {}).
    Keys keep whatever prefix they have."""
    keys = list(keys)
    if not any(k.rsplit(".", 1)[-1] == SCALED_FP8 or k.endswith(_SCALE_SUFFIXES) for k in keys):
        return keys, {}
    model = [k for k in keys if k.rsplit(".", 1)[-1] != SCALED_FP8 and not k.endswith(_SCALE_SUFFIXES)]
    present = set(keys)
    scales = {k: k[:-len("weight")] + "scale_weight" for k in model
              if k.endswith(".weight") and k[:-len("weight")] + "scale_weight" in present}
    return model, scales


def scaled_fp8_state_dict(model: torch.nn.Module, dtype=None) -> dict:
    """The model's state dict as ComfyUI's scaled-fp8 files hold it (scaled_fp8, with every Linear's weight and
    bias). Keys are the model's own (a family writer renames them)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    sd = model.state_dict()
    return scaled_fp8(sd, {f"{n}.weight" for n in linear}, {f"{n}.bias" for n in linear if f"{n}.bias" in sd}, dtype)


def scaled_fp8_renamed(model: torch.nn.Module, renamed: dict, layout_name: dict, dtype=None) -> dict:
    """scaled_fp8 of the model's state in another layout: `renamed` is that layout's state dict, `layout_name` maps
    each model key to its key there (several model keys may share one: a fused qkv, scaled whole)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    weights = {layout_name[f"{n}.weight"] for n in linear}
    biases = {layout_name[f"{n}.bias"] for n in linear if f"{n}.bias" in layout_name}
    return scaled_fp8(renamed, weights, biases, dtype)


def scaled_fp8(sd: dict, weights: set, biases: set, dtype=None) -> dict:
    """A state dict as ComfyUI's scaled-fp8 files hold it: each key in `weights` as float8_e4m3fn (weight / its
    absmax-derived scale) with a ``<module>.scale_weight`` beside it, the `biases` plain fp8 (ComfyUI's scaled-fp8
    ops hold Linear biases in fp8 too), everything else in ``dtype`` (None: as is), and the ``scaled_fp8``
    marker."""
    from .fp8 import FP8

    out = {}
    for k, v in sd.items():
        v = v.detach()
        if k in weights:
            scale = (v.float().abs().max() / torch.finfo(FP8).max).clamp(min=1e-12)
            out[k] = (v.float() / scale).to(FP8)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        elif k in biases:
            out[k] = v.to(FP8)
        else:
            out[k] = v.to(dtype or v.dtype)
    out[SCALED_FP8] = torch.empty(0, dtype=FP8)
    return out


def read_tensors(path, keys, dtype=None, device=None, progress=None, expected: str = "a diffusion model checkpoint",
                 scales: dict | None = None):
    """Tensors by key; dtype is one dtype for all or a dict key -> dtype (None: kept as stored).
    progress(bytes read, bytes to read), if given, after each tensor.
    scales {weight key: scale key} (scaled_fp8_keys): those weights come back dequantised, stored * scale in
    fp32, then cast to their dtype (a None dtype means the scale's, fp32)."""
    scales = scales or {}
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            to = dtype if isinstance(dtype, dict) else dict.fromkeys(names, dtype)
            if progress is not None:
                header = read_header(path, expected)
                sizes = [header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names]
                total, done = sum(sizes), 0
            out = {}
            for i, k in enumerate(names):
                # Cast one tensor at a time so peak memory stays near one copy of the model; copy=True
                # because get_tensor may return views of the file mapping, which change or fault if the file does.
                if k in scales:  # one fp32 copy of this tensor at a time, as for any cast
                    t = f.get_tensor(k).float() * f.get_tensor(scales[k]).float()
                    out[k] = t.to(device=device, dtype=to[k] or torch.float32)
                else:
                    out[k] = f.get_tensor(k).to(device=device, dtype=to[k], copy=True)
                if progress is not None:
                    done += sizes[i]
                    progress(done, total)
            return out
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError plus OS/key errors
        raise _unreadable(path, f"{type(e).__name__}: {e}", expected) from e


def read_state_dict(path, keys=None) -> dict:
    """Read all tensors (or only ``keys``) as stored; any failure becomes CheckpointError."""
    path = os.fspath(path)
    read_header(path)
    return read_tensors(path, keys)


def meta_shapes(header: dict, keys=None) -> dict:
    """key -> a meta tensor of the stored shape (configs are read off shapes without reading data)."""
    return {k: torch.empty(header[k]["shape"], device="meta") for k in (header if keys is None else keys)}


def stored_dtypes(header: dict, keys=None) -> set:
    return {ST_DTYPES.get(header[k]["dtype"], header[k]["dtype"]) for k in (header if keys is None else keys)}


def diffusion_model_keys(keys) -> tuple[list, str]:
    """(keys of the diffusion model, prefix to strip): a ComfyUI/SAI full checkpoint keeps it under
    model.diffusion_model. beside text encoders and VAE; other files hold only the model."""
    keys = list(keys)
    inside = [k for k in keys if k.startswith(COMFY_PREFIX)]
    return (inside, COMFY_PREFIX) if inside else (keys, "")


def num_blocks(keys, prefix) -> int:
    """Blocks under `prefix` + index: max index + 1, not the count, so a gap surfaces later as missing keys."""
    idx = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def key_sample(keys, n: int = 4) -> str:
    """A few keys, one per top-level prefix, shortened: enough to recognise what a file holds."""
    first = {}
    for k in sorted(keys):
        first.setdefault(k.split(".")[0], k)
    return ", ".join(repr(k if len(k) < 40 else k[:37] + "...") for k in list(first.values())[:n])


def guess_content(keys) -> str:
    """What a file that is not a known diffusion transformer probably is, for an error message."""
    hints = [(("input_blocks.", "middle_block.", "conditioner.", "label_emb."), "an SD/SDXL UNet"),
             (("encoder.conv_in", "decoder.", "first_stage_model.", "quant_conv"), "a VAE"),
             (("text_model.", "encoder.block.", "shared.", "text_projection", "cond_stage_model."), "a text encoder")]
    for prefixes, name in hints:
        if any(k.startswith(prefixes) for k in keys):
            return f"this looks like {name}"
    return "is this an SD/SDXL UNet or a VAE/text encoder?"


def checked_meta_model(model_class, config: dict, shapes: dict, label: str) -> torch.nn.Module:
    """The model for `config` built on the meta device, its state checked against `shapes` (the file's tensors
    under the model's own names, meta tensors do): CheckpointError for missing or unexpected keys and for
    shapes that do not fit, each naming a few. Nothing is read."""
    with torch.device("meta"):
        model = model_class(**config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    if missing:
        blocks = f" with {config['num_layers']} blocks" if "num_layers" in config else ""
        raise CheckpointError(f"{len(missing)} keys missing for a {label} transformer{blocks}, e.g. {missing[:5]}")
    left = sorted(set(shapes) - set(expected))
    if left:
        raise CheckpointError(f"{len(left)} unexpected keys for a {label} transformer, e.g. {left[:5]}")
    bad = [f"{k}: {tuple(shapes[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if shapes[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"tensor shapes do not fit the inferred {label} config, e.g. {bad[:3]}")
    return model


def resident_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """State key -> the dtype each resident tensor is kept in: fp8 where fp8 storage put it, else `dtype` (one
    dtype for the rest, as ComfyUI runs these models and the random presets are built)."""
    from .fp8 import FP8

    return {k: FP8 if v.dtype == FP8 else dtype for k, v in model.state_dict().items()}


def assign_state_dict(model: torch.nn.Module, sd: dict, path) -> torch.nn.Module:
    """load_state_dict(strict, assign) onto a meta-built model; fails loudly if anything stays on meta."""
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{os.fspath(path)}: tensors left on the meta device after loading: {left[:5]}")
    return model.eval().requires_grad_(False)
