"""LoRAs for every family: one parser for the file formats ComfyUI accepts, and merging into a model's weights
in place, strengths changeable without reloading the base model.

A family gives only its target table (``lora_targets``: module names as LoRA files spell them, in its original
layout and in diffusers', -> the diffusers parameters they patch) and a ``LoraFormat`` (its label for
messages, its own key schemes, what foreign files look like); ``parse_lora`` does the rest.

Key styles: kohya/ComfyUI (``lora_unet_<module with underscores>.lora_down.weight``, ``.alpha``), the original
dotted names (optionally under ``diffusion_model.``), diffusers/peft (``transformer.<module>.lora_A.weight``,
optional ``base_model.model.`` prefix), OneTrainer/SimpleTuner (``lora_transformer_*``, ``lycoris_*``), plus
whatever a family's ``split_key`` recognises. Full-delta ``.diff`` (weights) and ``.diff_b`` (biases) entries are
applied as well. A LoRA on a fused weight (qkv) is split by rows exactly like the weight it patches. Text-encoder
keys are counted and skipped: the text encoders are not ours.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open


class LoraError(ValueError):
    """A file that cannot be applied as a LoRA to this model; the message names the file."""


class LoraPatch(NamedTuple):
    """delta = scale * up @ down; with ``down`` None, ``up`` is the full delta (``.diff``/``.diff_b``)."""

    down: torch.Tensor | None
    up: torch.Tensor
    scale: float


class ParsedLora(dict):
    """diffusers parameter name -> LoraPatch, plus where it came from and what was skipped."""

    def __init__(self, patches=(), path="", format="", text_encoder_keys=0):
        super().__init__(patches)
        self.path, self.format, self.text_encoder_keys = path, format, text_encoder_keys


@dataclass(frozen=True)
class LoraFormat:
    """What one family's LoRA files look like, and how to talk about files that are not for it."""

    label: str                   # "... keys are not LoRA weights for this <label> transformer"
    model: str                   # "... LoRA weights do not match this <model> (e.g. ...)"
    native: tuple                # (style name, module-name prefixes) of the family's original layout
    hints: tuple = ()            # ((words in key names, other family), ...): what a foreign file reveals
    unknown_hint: str = ""       # said of unknown keys when no hint matches
    misfit_hint: str = ""        # said after shape mismatches
    split_key: Callable | None = None  # key -> (module, kind, style) for a family's own scheme, else None


def dense(p: LoraPatch) -> torch.Tensor:
    return p.up.float() * p.scale if p.down is None else (p.up.float() @ p.down.float()) * p.scale


def model_shapes(model) -> dict:
    """Parameter (and buffer) name -> shape: what a family's LoRA parser checks a file against."""
    return {k: v.shape for k, v in model.state_dict().items()}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged (shift, scale <-> scale, shift); its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def lora_targets(shapes: dict, rules=()) -> dict:
    """A family's target table: LoRA module name (original or diffusers, dots or underscores) ->
    {'weight'|'bias': ([diffusers keys], op)}.

    rules: (original key, [diffusers keys], op) with op 'copy', 'split' (fused rows, split by the targets' row
    counts) or 'swap' (the halves of the rows exchanged); rules whose targets the model lacks are dropped, and
    every model tensor is a target under its own diffusers name. A tensor named neither weight nor bias (a norm
    ``scale``, a position table) is the module's weight and is also a target under its full name."""
    keys = list(shapes)
    rules = [r for r in rules if all(d in shapes for d in r[1])] + [(k, [k], "copy") for k in keys]
    out = {}
    for key, ds, op in rules:
        mod, suffix = key.rsplit(".", 1) if "." in key else (key, "")
        out.setdefault(mod, {})["weight" if suffix in ("scale", "") else suffix] = (ds, op)
        if suffix not in ("weight", "bias", ""):  # ComfyUI also names these in full: '<...>.query_norm.scale.diff'
            out.setdefault(key, {})["weight"] = (ds, op)
    out.update({m.replace(".", "_"): t for m, t in list(out.items())})
    return out


# (down, up) suffix pairs, as ComfyUI's LoRA loader accepts them; longest first so none shadows another
_PAIRS = [(".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          (".lora_A.default.weight", ".lora_B.default.weight"), (".lora_down.weight", ".lora_up.weight"),
          (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
          (".lora_A.weight", ".lora_B.weight"), (".lora_A", ".lora_B")]
_SINGLE = {".alpha": "alpha", ".diff_b": "diff_b", ".diff": "diff", ".w_norm": "diff", ".b_norm": "diff_b"}
_UNSUPPORTED = (".dora_scale", ".lora_mid.weight", "hada_w", "lokr_w", ".set_weight", ".reshape_weight")
_TEXT = ("lora_te", "text_encoder")  # kohya lora_te/te1/te2/te3, diffusers text_encoder(_2), ComfyUI text_encoders
_STRIP = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_UNDERSCORE = ("lora_unet_", "lora_transformer_", "lycoris_")


def _module_name(name: str, targets) -> str | None:
    stripped = True
    while stripped:
        stripped = False
        for p in _STRIP:
            if name.startswith(p) and name[len(p):]:
                name, stripped = name[len(p):], True
    for p in _UNDERSCORE:
        if name.startswith(p):
            name = name[len(p):]
            break
    return name if name in targets else None


def _split_key(key, fmt: LoraFormat):
    """(module, kind, style) with kind down/up/alpha/diff/diff_b, style None unless the family's scheme named
    one; kind None for anything else."""
    if fmt.split_key is not None and (own := fmt.split_key(key)) is not None:
        return own
    for down, up in _PAIRS:
        for suffix, kind in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                return key[:-len(suffix)], kind, None
    for suffix, kind in _SINGLE.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], kind, None
    return key, None, None


def _style(module: str, name: str, own, fmt: LoraFormat) -> str:
    if own:
        return own
    if module.startswith("lora_unet_"):
        return "kohya"
    if module.startswith(("lora_transformer_", "lycoris_")):
        return "onetrainer"
    style, prefixes = fmt.native
    return style if name.startswith(prefixes) else "diffusers"


def _family_hint(names, fmt: LoraFormat, otherwise=None) -> str:
    for words, family in fmt.hints:
        if any(w in n for n in names for w in words):
            return f"this looks like a LoRA for {family}, not {fmt.label}"
    return fmt.unknown_hint if otherwise is None else otherwise


def _read(path) -> dict:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # clone: never alias the file mapping
    except Exception as e:  # safetensors raises its own SafetensorError plus OS errors
        raise LoraError(f"{path}: not a readable safetensors LoRA file ({type(e).__name__}: {e})") from e


def _misfit(name, ent, shapes, down, up):
    """Why a LoRA entry does not fit its target (None if it does); ``up`` is the delta when ``down`` is None."""
    ds, op = ent
    s = [shapes[d] for d in ds]
    rows = sum(x[0] for x in s) if op == "split" else s[0][0]
    want = (rows, *s[0][1:])
    if down is None:
        return None if tuple(up.shape) == want else f"{name!r} has shape {tuple(up.shape)}, model has {want}"
    if len(want) != 2:
        return f"{name!r} is a low-rank LoRA on a {len(want)}-D tensor of shape {want}"
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"{name!r} has inconsistent down/up shapes {tuple(down.shape)}, {tuple(up.shape)}"
    if down.shape[1] != want[1]:
        return f"{name!r} expects {down.shape[1]} inputs, model has {want[1]}"
    if up.shape[0] != want[0]:
        return f"{name!r} has {up.shape[0]} outputs, model has {want[0]}"
    return None


def _add(out, key, patch):
    if key not in out:
        out[key] = patch
        return
    old = out[key]  # the same tensor named twice in one file: both apply, as in ComfyUI
    if old.down is not None and patch.down is not None:  # stay low-rank: stack the ranks, scales folded into up
        out[key] = LoraPatch(torch.cat([old.down.float(), patch.down.float()]),
                             torch.cat([old.up.float() * old.scale, patch.up.float() * patch.scale], 1), 1.0)
    else:
        out[key] = LoraPatch(None, dense(old) + dense(patch), 1.0)


def parse_lora(path, shapes: dict, targets: dict, fmt: LoraFormat) -> ParsedLora:
    """Parse a LoRA file into {diffusers parameter name: LoraPatch}, checked against the whole model's shapes.

    targets: the family's table (lora_targets); fmt: its LoraFormat. Scale is alpha / rank (1.0 without an
    alpha, as ComfyUI does). Raises LoraError naming the file for unreadable files, keys that are not this
    family's transformer weights and LoRA shapes that do not fit."""
    path = os.fspath(path)
    sd = _read(path)
    groups, unknown, unsupported, text, styles = {}, [], [], 0, set()
    for key, t in sd.items():
        if key.startswith(_TEXT):
            text += 1
            continue
        if any(u in key for u in _UNSUPPORTED):
            unsupported.append(key)
            continue
        mod, kind, own = _split_key(key, fmt)
        name = _module_name(mod, targets) if kind else None
        if name is None:
            unknown.append(key)
            continue
        styles.add(_style(mod, name, own, fmt))
        groups.setdefault((name, mod), {})[kind] = t
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not LoRA weights for this {fmt.label} transformer "
                        f"(e.g. {unknown[:3]}); {_family_hint(unknown, fmt)}")
    if unsupported:
        hint = _family_hint(unsupported, fmt, "only plain LoRA (down/up, alpha, diff, diff_b) can be merged")
        raise LoraError(f"{path}: {len(unsupported)} keys use a LoRA type that is not supported "
                        f"(DoRA/LoCon/LoHa/LoKr/set-weight), e.g. {unsupported[:3]}; {hint}")
    if not groups and not text:
        raise LoraError(f"{path}: contains no LoRA weights")
    out, misfits = ParsedLora(path=path, format="+".join(sorted(styles)), text_encoder_keys=text), []
    for (name, mod), g in groups.items():
        t = targets[name]
        lowrank = "down" in g or "up" in g
        if lowrank and not ("down" in g and "up" in g):
            misfits.append(f"{mod!r} has only a {'down' if 'down' in g else 'up'} weight")
            continue
        items = ([("weight", g["down"], g["up"])] if lowrank else []) + \
                [(s, None, g[k]) for k, s in (("diff", "weight"), ("diff_b", "bias")) if k in g]
        if not items:
            misfits.append(f"{mod!r} has an alpha but no weights")
            continue
        for suffix, down, up in items:
            if suffix not in t:
                misfits.append(f"{mod!r} patches a {suffix} the model does not have")
                continue
            if why := _misfit(mod, t[suffix], shapes, down, up):
                misfits.append(why)
                continue
            ds, op = t[suffix]
            scale = float(g["alpha"].item()) / down.shape[0] if down is not None and "alpha" in g else 1.0
            # rows of B (or of a full delta) are split/swapped exactly like the fused weight's rows
            parts = ([swap_halves(up)] if op == "swap" else up.split([shapes[d][0] for d in ds])
                     if op == "split" else [up])
            for d, u in zip(ds, parts):
                _add(out, d, LoraPatch(down, u, scale))
    if misfits:
        raise LoraError(f"{path}: {len(misfits)} LoRA weights do not match this {fmt.model} "
                        f"(e.g. {misfits[0]}); {fmt.misfit_hint}")
    return out


def lora_rank_info(parsed: ParsedLora) -> dict:
    """Small summary for logs: targeted parameters, rank histogram, full deltas, skipped text-encoder keys."""
    ranks = Counter(p.down.shape[0] for p in parsed.values() if p.down is not None)
    return dict(format=getattr(parsed, "format", ""), weights=len(parsed), ranks=dict(sorted(ranks.items())),
                full_deltas=sum(p.down is None for p in parsed.values()),
                text_encoder_keys=getattr(parsed, "text_encoder_keys", 0))


class LoraMerger:
    """Merges LoRAs into a model's weights in place; strengths can change without reloading the base model.

    The first time a weight is touched its original value is copied to the CPU; every change recomputes
    weight = original + sum(strength * delta) in fp32 and writes it with copy_(), so nothing drifts and
    weights that are views into a fused tensor stay views. Backups are dropped when a weight is restored."""

    def __init__(self, model, elsewhere: frozenset = frozenset()):
        """elsewhere: parameter names held by other ranks (PipeFusion stages); their patches are skipped here."""
        self.model = model
        self.elsewhere = elsewhere
        self._params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        self._backup: dict[str, torch.Tensor] = {}
        self._current: list | None = []

    def current(self) -> list:
        """The applied [(lora_id, parsed_lora, strength), ...]."""
        return list(self._current or [])

    def _unchanged(self, new) -> bool:
        old = self._current
        return old is not None and len(old) == len(new) and all(
            a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(old, new))

    @torch.no_grad()
    def set_loras(self, loras) -> None:
        """Make exactly ``[(lora_id, parsed_lora, strength), ...]`` applied; a no-op if nothing changed."""
        new = [(i, lora, float(s)) for i, lora, s in loras]
        if self._unchanged(new):
            return
        plan: dict[str, list] = {}
        for lora_id, lora, s in new:
            if not math.isfinite(s):
                raise LoraError(f"{lora_id}: strength must be a finite number, got {s}")
            for name, patch in (lora.items() if s else ()):
                p = self._params.get(name)
                if p is None and name in self.elsewhere:
                    continue
                shape = tuple(patch.up.shape) if patch.down is None else (patch.up.shape[0], patch.down.shape[1])
                if p is None or shape != tuple(p.shape):
                    raise LoraError(f"{getattr(lora, 'path', lora_id)}: LoRA targets {name!r} with shape {shape}, "
                                    f"{'which this model lacks' if p is None else f'model has {tuple(p.shape)}'}")
                plan.setdefault(name, []).append((patch, s))
        self._current = None  # if anything below fails, the next call rebuilds every weight from the backups
        for name in [n for n in self._backup if n not in plan]:
            self._params[name].copy_(self._backup[name])
            del self._backup[name]
        for name, patches in plan.items():
            p = self._params[name]
            if name not in self._backup:
                self._backup[name] = p.detach().to("cpu", copy=True)
            w = self._backup[name].to(p.device, torch.float32, copy=True)
            for patch, s in patches:
                up = patch.up.to(p.device, torch.float32)
                d = up if patch.down is None else up @ patch.down.to(p.device, torch.float32)
                w.add_(d, alpha=s * patch.scale)
            p.copy_(w)
        self._current = new
