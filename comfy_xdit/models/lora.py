"""LoRA merging shared by every family: parsed patches (diffusers parameter name -> LoraPatch) merged into a
model's weights in place, strengths changeable without reloading the base model. Parsing a family's file
formats is the family's (models/flux/lora.py)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class LoraError(ValueError):
    """A file that cannot be applied as a LoRA to this model; the message names the file."""


class LoraPatch(NamedTuple):
    """delta = scale * up @ down; with ``down`` None, ``up`` is the full delta (``.diff``/``.diff_b``)."""

    down: torch.Tensor | None
    up: torch.Tensor
    scale: float


def dense(p: LoraPatch) -> torch.Tensor:
    return p.up.float() * p.scale if p.down is None else (p.up.float() @ p.down.float()) * p.scale


def model_shapes(model) -> dict:
    """Parameter (and buffer) name -> shape: what a family's LoRA parser checks a file against."""
    return {k: v.shape for k, v in model.state_dict().items()}


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
